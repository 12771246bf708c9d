import os

import pytest
import scipy.linalg  # noqa: F401 - load scipy's BLAS now, so that the limit below reaches it
import scipy.optimize  # noqa: F401
import torch
from threadpoolctl import threadpool_limits

THREADS = int(os.environ.get("SMOOTHCERT_TEST_THREADS", "2"))
torch.set_num_threads(THREADS)
# The tests' linear algebra (scipy's optimizers, small numpy products) is far too small for BLAS threads, and
# OpenMP's pool must not exceed torch's: on a busy machine their waiting threads made the first-order radius
# searches (thousands of small L-BFGS-B runs) 10-30x slower.
threadpool_limits(1, user_api="blas")
threadpool_limits(THREADS, user_api="openmp")


class Linear2(torch.nn.Module):
    """Binary linear classifier f(x) = 1[w.x + b > 0], as logits (0, w.x + b)."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.register_buffer("w", w.reshape(-1).float())
        self.b = float(b)

    def forward(self, x):
        s = x.reshape(x.shape[0], -1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


@pytest.fixture
def linear2():
    return Linear2
