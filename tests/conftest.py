import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("SMOOTHCERT_TEST_THREADS", "2")))


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
