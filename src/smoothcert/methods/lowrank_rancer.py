"""RANCER in low rank: the top-k Hessian eigenvectors without the d x d Hessian, and ANCER's ascent on k + 1 scales.

RANCER (seed 000 chapter 4) rotates the noise into the eigenvectors of the loss Hessian ``H`` at the input (eq. 4.7)
and optimizes one scale per eigenvector. At d = 3,072 the Hessian alone is 75 MB per input and its
eigen-decomposition O(d^3); the low-rank form keeps the k eigenvectors of largest ``|lambda|`` and one scale
``sigma_perp`` for the rest:

    noise = sigma_perp w + Q ((s - sigma_perp) * (Q^T w)),   A = diag(sigma_perp) (I + Q diag(s / sigma_perp - 1) Q^T),

the :class:`~smoothcert.noise.lowrank.LowRankGaussian` with ``theta = sigma_perp``, ``gamma = s / sigma_perp - 1``
(for an orthonormal ``Q`` its singular values are ``s`` along ``Q`` and ``sigma_perp`` elsewhere).

* :func:`~smoothcert.methods.hessian.top_eigenvectors` -- randomized subspace iteration (Halko, Martinsson and
  Tropp 2011, Alg. 4.4) with Hessian-vector products ``H v = d/dx (grad L(x) . v)`` by double backward, batched over inputs and over the
  ``k + oversample`` probe vectors, seeded; then Rayleigh-Ritz on ``Q^T H Q`` (a small ``eigh``). For a network
  that is piecewise linear in ``x`` autograd's second derivative of ReLU and max-pool is zero, so the product is
  ``J^T (diag(p) - p p^T) J v`` (the Jacobian form of :mod:`smoothcert.methods.hessian`), rank at most ``K - 1``.
  The eigenvectors only choose the noise (like the full path's), so their accuracy affects tightness, never
  soundness: the certificate is the region of the noise as sampled.
* :func:`optimize_lowrank` -- Adam on ANCER's objective (seed 000 eq. 3.15) over the d semi-axes
  ``(s_1..s_k, sigma_perp, ..., sigma_perp)`` (the geometric mean over all d of them), every parameter clipped
  to RANCER's window ``[theta_iso (1 - lambda_1), theta_iso (1 + lambda_2)]`` after every step (eq. 4.8).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from smoothcert.methods.ancer import anisotropic_objective
from smoothcert.methods.optimize import (FailureLog, OptimizationResult, check_optimizer_arguments, class_slots,
                                         classes_of, finish_optimization, mean_probs, noise_family,
                                         objective_and_gradient, objective_gap, started_gap)

__all__ = ["optimize_lowrank", "full_scales"]


def full_scales(params: torch.Tensor, d: int) -> torch.Tensor:
    """(B, k + 1) parameters ``(s_1..s_k, sigma_perp)`` as the (B, d) semi-axis scales ``(s, sigma_perp, ...)``."""
    k = params.shape[1] - 1
    return torch.cat([params[:, :k], params[:, k:].expand(params.shape[0], d - k)], dim=1)


def optimize_lowrank(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    theta0: torch.Tensor,
    basis: torch.Tensor,
    *,
    generators: Sequence[torch.Generator | None],
    lower: torch.Tensor,
    upper: torch.Tensor,
    steps: int = 100,
    lr: float = 0.04,
    samples: int = 100,
    kappa: float = 2.0,
    gap: str = "pa",
    classes: torch.Tensor | None = None,
    max_batch: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> OptimizationResult:
    """Adam on ``gap * geomean + kappa * gap * min`` of the d semi-axes; returns (B, k + 1) ``(s, sigma_perp)``.

    ``theta0``, ``lower``, ``upper``: (B,) (the DDS scale and RANCER's window); ``basis``: (B, d, k) orthonormal
    columns. The draws ``w`` are the Gaussian reparameterization (seed 000 eq. 3.7); the perturbation is
    ``sigma_perp w + Q ((s - sigma_perp) * (Q^T w))``. ``callback(step, params)`` sees the clipped parameters.
    """
    check_optimizer_arguments(x, generators, steps, lr, samples, "gaussian", gap)
    family = noise_family("gaussian")
    b, shape = x.shape[0], tuple(x.shape[1:])
    d, k = basis.shape[1], basis.shape[2]
    x = x.detach().float()
    q = basis.detach().to(device=x.device, dtype=torch.float32).contiguous()
    low = torch.as_tensor(lower, dtype=torch.float32, device=x.device).reshape(b, 1).expand(b, k + 1)
    high = torch.as_tensor(upper, dtype=torch.float32, device=x.device).reshape(b, 1).expand(b, k + 1)
    start = torch.as_tensor(theta0, dtype=torch.float32, device=x.device).reshape(b, 1).expand(b, k + 1)
    params = torch.clamp(start.clone(), min=low, max=high).requires_grad_(True)
    optimizer = torch.optim.Adam([params], lr=lr)
    failures = FailureLog(b, "rancer-lowrank", x.device)
    history = []
    slots, gate = class_slots(classes, b, x.device), class_slots(None, b, x.device)

    def perturb(w: torch.Tensor, rows: slice) -> torch.Tensor:
        n, m = w.shape[:2]
        flat = w.reshape(n, m, d)
        s, perp = params[rows, :k], params[rows, k:]
        proj = torch.bmm(flat, q[rows])  # (n, m, k) = (Q^T w)^T
        out = perp[:, None, :] * flat + torch.bmm(proj * (s - perp)[:, None, :], q[rows].transpose(1, 2))
        return out.reshape(n, m, *shape)

    def objective(probs: torch.Tensor, rows: slice) -> torch.Tensor:
        g = started_gap(gate, objective_gap(probs, classes_of(slots, probs, rows), family, gap), rows)
        return anisotropic_objective(g, full_scales(params[rows], d), kappa)

    for step in range(steps):
        w = family.standard_draws(generators, samples, shape, x.device)
        obj, (grad,) = objective_and_gradient(model, x, w, perturb, objective, [params], max_batch)
        failures.check(step, "objective gap * (geomean + kappa min)(scales)", obj)
        ok = failures.check(step, "gradient of the objective", grad)
        history.append(obj)
        optimizer.zero_grad(set_to_none=True)
        params.grad = torch.where(ok[:, None], -grad, torch.zeros_like(grad))
        with torch.no_grad():
            optimizer.step()
            params.copy_(torch.clamp(params, min=low, max=high))
        if callback is not None:
            callback(step, params.detach())
    return finish_optimization(params, failures, history, slots, lambda: mean_probs(
        model, x, family.standard_draws(generators, samples, shape, x.device), perturb, max_batch))
