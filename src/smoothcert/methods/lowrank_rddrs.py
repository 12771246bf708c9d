"""RDDRS in low rank: the Riemannian ascent of seed 003 on a diagonal-times-subspace family of scales.

The full path (:mod:`smoothcert.methods.rddrs`) moves a d x d SPD scale ``C``. The low-rank family keeps the top-k
loss-Hessian eigenvectors ``Q`` (d, k) fixed (:func:`~smoothcert.methods.hessian.top_eigenvectors`) and moves

    A = diag(theta) (I - Q Q^T + Q M Q^T),   theta in R^d, > 0 (diagonal SPD),   M in SPD(k),

O(d + k^2) parameters (for an orthonormal ``Q`` it is ``diag(theta) (I + Q (M - I) Q^T)``, the
:class:`~smoothcert.noise.lowrank.LowRankGaussian` with the basis ``Q R`` and ``gamma = eig(M) - 1``, ``M = R diag(.)
R^T``). The objective is seed 003 eq. 5, ``H = R (P + kappa K)``, with ``R`` the gap of the averaged softmax under
``A w`` (Monte Carlo, reparameterized), ``P = |det A|^(1/d) = exp((sum log theta + log det M) / d)`` and
``K = min(theta)``, which bounds ``sigma_min(A)`` from below while ``M >= I``. The ascent is seed 003 eq. 6 on the
product manifold ``Diag+(d) x SPD(k)``, each factor with its affine-invariant metric:

* diagonal part: ``Exp_D(V) = D expm(D^-1 V)``, with the Riemannian gradient ``V = D (dH/dD) D``, is the elementwise
  ``theta <- theta exp(t theta dH/dtheta)``;
* subspace part: ``M <- M^1/2 expm(t M^1/2 sym(dH/dM) M^1/2) M^1/2`` (eq. 6 in k x k);

and the step ``t = lr`` is shortened so that no log-factor exceeds ``max_log_step`` (the full path's trust region,
:data:`~smoothcert.methods.optimize.RDDRS_MAX_LOG_STEP`, over both parts at once). After each step ``theta >= sigma*``
and ``eig(M) >= 1``, so every singular value of ``A`` stays ``>= sigma*`` (the full path's floor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.methods.optimize import (RDDRS_MAX_LOG_STEP, FailureLog, OptimizationResult,
                                         check_optimizer_arguments, class_slots, classes_of, finish_optimization,
                                         mean_probs, objective_and_gradient, objective_gap, started_gap)

__all__ = ["optimize_rddrs_lowrank", "split_params"]


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def split_params(params: torch.Tensor, d: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, d + k^2) parameters as ``(theta (B, d), M (B, k, k))``."""
    return params[:, :d], params[:, d:].reshape(-1, k, k)


def optimize_rddrs_lowrank(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma_star: torch.Tensor,
    basis: torch.Tensor,
    *,
    generators: Sequence[torch.Generator | None],
    steps: int = 100,
    lr: float = 1.0,
    samples: int = 1000,
    kappa: float = 1e-6,
    gap: str = "pa",
    classes: torch.Tensor | None = None,
    max_batch: int | None = None,
    max_log_step: float = RDDRS_MAX_LOG_STEP,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> OptimizationResult:
    """The ascent above for every input of ``x``; returns (B, d + k^2) float64 ``(theta, M)`` (:func:`split_params`).

    Starts at ``theta = sigma*`` (scalar or (B,)), ``M = I``; ``basis`` (B, d, k) orthonormal columns.
    ``callback(step, theta, M)`` sees the parameters after every update.
    """
    check_optimizer_arguments(x, generators, steps, lr, samples, IsotropicGaussian, gap, max_log_step)
    b, shape = x.shape[0], tuple(x.shape[1:])
    d, k = basis.shape[1], basis.shape[2]
    x = x.detach().float()
    floor = torch.as_tensor(sigma_star, dtype=torch.float64, device=x.device).expand(b).clone()
    if not bool(torch.isfinite(floor).all()) or bool((floor <= 0).any()):
        raise ValueError("sigma_star (the scale floor) must be finite and > 0")
    q = basis.detach().to(device=x.device, dtype=torch.float32).contiguous()
    theta = floor[:, None].expand(b, d).clone()
    m = torch.eye(k, dtype=torch.float64, device=x.device).expand(b, k, k).clone()
    eye = torch.eye(k, dtype=torch.float64, device=x.device)
    failures = FailureLog(b, "rddrs-lowrank", x.device)
    history = []
    slots, gate = class_slots(classes, b, x.device), class_slots(None, b, x.device)

    def make_perturb(theta_t: torch.Tensor, m_t: torch.Tensor):
        def perturb(w: torch.Tensor, rows: slice) -> torch.Tensor:
            n, s = w.shape[:2]
            flat = w.reshape(n, s, d)
            proj = torch.bmm(flat, q[rows])  # (n, s, k) rows of (Q^T w)^T
            inner = torch.bmm(proj, m_t[rows] - torch.eye(k, device=x.device))  # ((M - I) Q^T w)^T, M symmetric
            return (theta_t[rows, None, :] * (flat + torch.bmm(inner, q[rows].transpose(1, 2)))).reshape(n, s, *shape)
        return perturb

    for step in range(steps):
        theta_leaf = theta.float().requires_grad_(True)
        m_leaf = m.float().requires_grad_(True)
        ev, vec = torch.linalg.eigh(_sym(m))
        geo = torch.exp((torch.log(theta).sum(1) + torch.log(ev).sum(1)) / d)  # P = |det A|^(1/d)
        low, low_index = theta.min(dim=1)  # K = min theta
        factor = (geo + kappa * low).float()

        def objective(probs: torch.Tensor, rows: slice) -> torch.Tensor:
            gaps = objective_gap(probs, classes_of(slots, probs, rows), IsotropicGaussian, gap)
            return started_gap(gate, gaps, rows) * factor[rows]

        w = IsotropicGaussian.standard_draws(generators, samples, shape, x.device)
        obj, (g_theta, g_m) = objective_and_gradient(model, x, w, make_perturb(theta_leaf, m_leaf), objective,
                                                     [theta_leaf, m_leaf], max_batch)
        history.append(obj)
        r = (obj / factor).double()  # R
        failures.check(step, "objective R (P + kappa K)", obj)
        ok = failures.check(step, "Euclidean gradients dR/dtheta, dR/dM", g_theta, g_m)
        # log-steps: theta dH/dtheta (diagonal part) and M^1/2 dH/dM M^1/2 (subspace part); dH = (P + kK) dR + R dP
        # + kappa R dK, with theta dP/dtheta = P / d, M^1/2 (dP/dM) M^1/2 = P I / d, theta dK/dtheta = K e_min
        log_theta = theta * g_theta.double() + (r * geo / d)[:, None]
        log_theta[torch.arange(b), low_index] += kappa * r * low
        root = (vec * ev.sqrt()[:, None, :]) @ vec.transpose(1, 2)
        log_m = root @ _sym(g_m.double()) @ root + (r * geo / d)[:, None, None] * eye
        mu, rot = torch.linalg.eigh(_sym(lr * log_m))
        size = torch.maximum((lr * log_theta).abs().amax(1), mu.abs().amax(1))
        shrink = max_log_step / size.clamp(min=max_log_step)  # the trust region over both parts
        new_theta = theta * torch.exp(lr * log_theta * shrink[:, None])
        new_m = _sym(root @ ((rot * torch.exp(mu * shrink[:, None])[:, None, :]) @ rot.transpose(1, 2)) @ root)
        nev, nvec = torch.linalg.eigh(new_m)
        new_m = _sym((nvec * nev.clamp(min=1.0)[:, None, :]) @ nvec.transpose(1, 2))  # eig(M) >= 1
        new_theta = torch.maximum(new_theta, floor[:, None])  # theta >= sigma*
        ok = ok & failures.check(step, "Riemannian step", new_theta, new_m)
        theta = torch.where(ok[:, None], new_theta, theta)
        m = torch.where(ok[:, None, None], new_m, m)
        if callback is not None:
            callback(step, theta.clone(), m.clone())
    params = torch.cat([theta, m.reshape(b, k * k)], dim=1)
    perturb = make_perturb(theta.float(), m.float())
    return finish_optimization(params, failures, history, slots, lambda: mean_probs(
        model, x, IsotropicGaussian.standard_draws(generators, samples, shape, x.device), perturb, max_batch))
