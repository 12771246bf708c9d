"""RDDRS: Riemannian data-dependent randomized smoothing (Labarbarie, Hajri, Arnaudon; seed 003).

Per input, a full symmetric positive definite scale ``C`` (noise ``C w``, ``w ~ N(0, I)``, as in
:class:`~smoothcert.noise.FullGaussian`) certifies the ellipsoid ``{||C^-1 delta||_2 <= gap}`` whose semi-axes
are ``C``'s eigenvalues ``lambda_i`` times the gap (seed 003 eq. 2). ``C`` maximizes the penalized objective
(eq. 5)

    H(C) = R(C) P(C) + kappa K(C) R(C),   P = geomean(lambda) = exp(mean log lambda),   K = min lambda,

with ``R(C) = gap(G(C))``, ``G(C) = E[softmax f(x + C Z)]``, subject to ``lambda_i >= sigma*`` (the DDS scale
of eq. 3), by Riemannian gradient ascent for the affine-invariant metric ``g_C(A, B) = tr(C^-1 A C^-1 B)``:

    C <- Exp_C(gamma grad H(C)),   grad H(C) = C sym(dH/dC) C,
    Exp_C(V) = C^1/2 expm(C^-1/2 V C^-1/2) C^1/2                                   (eq. 6),

so ``Exp_C(gamma C E C) = C^1/2 expm(gamma C^1/2 E C^1/2) C^1/2`` with ``E`` the symmetrized Euclidean gradient.
``dR/dC`` is the Monte Carlo gradient of eq. 6's ``E[A]`` (reparameterized: ``d/dC f(x + C Z) = grad f(y) Z^T``,
symmetrized), ``dP/dC = P C^-1 / d`` and ``dK/dC = v v^T`` (``v`` the eigenvector of the smallest eigenvalue),
so the Riemannian gradients of P and K are ``P C / d`` and ``lambda_min^2 v v^T`` as in the paper. After every
step ``C`` is re-symmetrized and its eigenvalues are clipped to ``>= sigma*``. All matrix functions are
eigen-decompositions of symmetric matrices in float64, computed in ``C``'s own eigenbasis (where ``C^1/2`` is
diagonal): per step two eigen-decompositions and five products of d x d matrices.

Defaults: ``kappa = 1e-6``, ``gamma = 1``, 100 steps (seed 003 section 4), and ``--rddrs-samples 1000`` Monte
Carlo samples per step for the gradient of ``G`` - the paper uses 20,000; fewer samples make each step ~20x
cheaper and the ascent noisier (the trade-off is measured by ``benchmarks/optimization.py``). For MNIST (d = 784)
each input carries a 784 x 784 matrix: two eigen-decompositions per step, slow on a CPU but exact.

``--rddrs-rank K`` (K > 0) runs the same ascent on the family ``diag(theta) (I - Q Q^T + Q M Q^T)`` with ``Q`` the
top-K Hessian eigenvectors and ``M`` a K x K SPD block (:mod:`smoothcert.methods.lowrank_rddrs`): O(d K) numbers
per input and per certificate (:class:`~smoothcert.noise.lowrank.LowRankGaussian`), for CIFAR-sized inputs.
0 (the default) is the full path, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from smoothcert.geometry.linalg import geometric_mean
from smoothcert.noise.gaussian import FullGaussian, IsotropicGaussian
from smoothcert.noise.lowrank import LowRankGaussian
from smoothcert.methods.base import RunContext
from smoothcert.methods.hessian import top_eigenvectors
from smoothcert.methods.lowrank_rddrs import optimize_rddrs_lowrank, split_params
from smoothcert.methods.datadependent import Choice, DataDependentMethod, DataDependentSettings, norm_setting
from smoothcert.methods.optimize import (RDDRS_MAX_LOG_STEP, FailureLog, OptimizationResult,
                                         check_optimizer_arguments, class_slots, classes_of, fallback_reason,
                                         finish_optimization, mean_probs, objective_and_gradient, objective_gap,
                                         started_gap)
from smoothcert.settings import integer, number

__all__ = ["optimize_rddrs", "spd_exp", "RDDRS", "RDDRSSettings"]


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def _compose(vectors: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``V diag(values) V^T``, exactly symmetric."""
    return _sym((vectors * values.unsqueeze(-2)) @ vectors.transpose(-1, -2))


def spd_exp(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The affine-invariant exponential map ``Exp_C(V) = C^1/2 expm(C^-1/2 V C^-1/2) C^1/2`` (seed 003 eq. 6).

    ``c`` SPD and ``v`` symmetric, (..., d, d); float64 eigen-decompositions.
    """
    values, vectors = torch.linalg.eigh(_sym(c.double()))
    half = _compose(vectors, values.sqrt())
    inv_half = _compose(vectors, values.rsqrt())
    mu, r = torch.linalg.eigh(_sym(inv_half @ v.double() @ inv_half))
    return _sym(half @ _compose(r, mu.exp()) @ half)


#: The d x d float64 matrices of the ascent step are updated for groups of inputs holding at most this many bytes
#: per matrix: at d = 784 (4.9 MB a matrix) one input at a time, where a batch of 8 (39 MB per temporary, beyond the
#: processor's cache and the allocator's reuse) ran the step's elementwise work 10x slower; at d = 64, 256 inputs.
MATRIX_GROUP_BYTES = 8 * 2**20


def _ascent_step(values, vectors, grad, r, geo, low, low_index, floor, failures, rows, step, lr: float,
                 kappa: float, max_log_step: float):
    """One step ``C <- Exp_C(t grad H(C))`` (eq. 6) for a group ``rows`` of inputs, written in ``C``'s eigenbasis
    ``Q`` (``C = Q diag(values) Q^T``), where ``C^1/2`` is diagonal:

        L = C^-1/2 grad H C^-1/2
          = diag(sqrt v) (Q^T dR Q) diag(sqrt v) (P + kappa K) + R (P / d) I + kappa R v_min e e^T,

    and the new ``C`` is ``diag(sqrt v) expm(t L) diag(sqrt v)`` there, its eigenvalues clipped to ``>= floor``.
    ``t = lr``, shortened where needed so that ``||t L||_2 <= max_log_step``: the step's eigenvalues ``mu`` of
    ``t L`` are ``log`` of the factors by which it stretches ``C`` (``C^-1/2 C' C^-1/2 = expm(t L)``), so no step
    changes ``C`` by more than ``exp(max_log_step)`` in any direction (a trust region on the largest log-factor;
    the affine-invariant distance of seed 003, ``||log(C^-1/2 C' C^-1/2)||_F``, is at most ``sqrt(d)`` times it;
    the direction of the step is the published one). Without it, the geometric-mean term alone
    grows ``P`` like ``P' = P exp(lr R P / d)``, which reaches infinity in about ``d / (lr R P)`` steps (4 steps
    at d = 2, P = 3), and long before that ``C``'s small eigenvalues are lost to round-off. ``grad`` is ``dR/dC``
    times ``P + kappa K``. Rows that fail (``failures``, the reason recorded) keep their ``C``.
    Returns (values, vectors)."""
    b, d = values.shape
    roots = values.sqrt()
    local = _sym(vectors.transpose(1, 2) @ _sym(grad.double()) @ vectors) * roots[:, :, None] * roots[:, None, :]
    local = local + torch.diag_embed((r * geo / d)[:, None].expand(b, d))
    local[torch.arange(b), low_index, low_index] += kappa * r * low
    ok = failures.check(step, "Riemannian gradient C^-1/2 grad H C^-1/2", local, rows=rows)
    mu, rot = torch.linalg.eigh(torch.where(ok[:, None, None], lr * local, torch.zeros_like(local)))
    mu = mu * (max_log_step / mu.abs().amax(dim=1).clamp(min=max_log_step))[:, None]  # the trust region
    scaled = rot * roots[:, :, None]  # diag(sqrt v) R
    new_local = _sym((scaled * mu.exp()[:, None, :]) @ scaled.transpose(1, 2))
    ok = failures.check(step, "exponential map Exp_C", new_local, rows=rows)
    new_values, turn = torch.linalg.eigh(torch.where(ok[:, None, None], new_local, torch.diag_embed(values)))
    new_values = torch.maximum(new_values, floor[:, None])  # eigenvalues >= sigma*
    new_vectors = vectors @ turn
    ok = failures.check(step, "eigen-decomposition of the new C", new_values, new_vectors, rows=rows)
    return torch.where(ok[:, None], new_values, values), torch.where(ok[:, None, None], new_vectors, vectors)


def optimize_rddrs(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma_star: float | torch.Tensor,
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
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> OptimizationResult:
    """Riemannian ascent of eq. 5 for every input of ``x`` (B, *shape) at once; returns (B, d, d) float64 ``C``.

    ``C`` starts at ``sigma* I`` and keeps eigenvalues ``>= sigma*`` (scalar or (B,)); an input whose gap at the
    start is <= 0 keeps it (:func:`~smoothcert.methods.optimize.started_gap`); one step stretches ``C`` by at
    most ``exp(max_log_step)`` (:func:`_ascent_step`).
    ``callback(step, C)`` sees ``C`` after every update (symmetric, clipped).
    """
    check_optimizer_arguments(x, generators, steps, lr, samples, IsotropicGaussian, gap, max_log_step)
    b, shape = x.shape[0], tuple(x.shape[1:])
    d = int(torch.tensor(shape).prod()) if shape else 1
    x = x.detach().float()
    floor = torch.as_tensor(sigma_star, dtype=torch.float64, device=x.device).expand(b).clone()
    if not bool(torch.isfinite(floor).all()) or bool((floor <= 0).any()):
        raise ValueError("sigma_star (the eigenvalue floor) must be finite and > 0")
    values = floor[:, None].expand(b, d).clone()
    vectors = torch.eye(d, dtype=torch.float64, device=x.device).expand(b, d, d).clone()
    c = _compose(vectors, values)
    failures = FailureLog(b, "rddrs", x.device)
    history = []
    slots, gate = class_slots(classes, b, x.device), class_slots(None, b, x.device)

    group = max(1, MATRIX_GROUP_BYTES // (8 * d * d))  # inputs whose d x d matrices are updated together
    for step in range(steps):
        leaf = c.float().requires_grad_(True)
        geo = geometric_mean(values, dim=1)  # P(C)
        low, low_index = values.min(dim=1)  # K(C)
        factor = (geo + kappa * low).float()

        def perturb(w: torch.Tensor, rows: slice) -> torch.Tensor:
            n, m = w.shape[:2]
            return torch.bmm(w.reshape(n, m, d), leaf[rows]).reshape(n, m, *shape)  # rows (C w)^T, C symmetric

        def objective(probs: torch.Tensor, rows: slice) -> torch.Tensor:
            gaps = objective_gap(probs, classes_of(slots, probs, rows), IsotropicGaussian, gap)
            return started_gap(gate, gaps, rows) * factor[rows]

        w = IsotropicGaussian.standard_draws(generators, samples, shape, x.device)
        obj, (grad_c,) = objective_and_gradient(model, x, w, perturb, objective, [leaf], max_batch)
        history.append(obj)
        r = (obj / factor).double()  # R(C)
        failures.check(step, "objective R(C) (P + kappa K)", obj)
        failures.check(step, "Euclidean gradient dR/dC", grad_c)
        for g in range(0, b, group):
            rows = slice(g, min(b, g + group))
            values[rows], vectors[rows] = _ascent_step(
                values[rows], vectors[rows], grad_c[rows], r[rows], geo[rows], low[rows], low_index[rows],
                floor[rows], failures, rows, step, lr, kappa, max_log_step)
            c[rows] = _compose(vectors[rows], values[rows])
        if callback is not None:
            callback(step, c.clone())
    scale = c.float()
    return finish_optimization(c, failures, history, slots, lambda: mean_probs(
        model, x, IsotropicGaussian.standard_draws(generators, samples, shape, x.device),
        lambda v, rows: torch.bmm(v.reshape(*v.shape[:2], d), scale[rows]).reshape(*v.shape[:2], *shape), max_batch))


@dataclass(frozen=True)
class RDDRSSettings(DataDependentSettings):
    """The DDS settings (l2 only), then the Riemannian ascent (seed 003 eq. 5-6)."""

    norm: str = norm_setting("l2")
    rddrs_steps: int = integer(100, low=0, help="Riemannian ascent steps")
    rddrs_lr: float = number(1.0, low=0.0, help="step size gamma")
    rddrs_samples: int = integer(1000, low=1, help="Monte Carlo samples per step for the gradient of G "
                                                   "(the paper: 20000)")
    rddrs_kappa: float = number(1e-6, low=0.0, help="weight of the min-eigenvalue term")
    rddrs_rank: int = integer(0, low=0, help="low-rank RDDRS: K > 0 moves diag(theta) and a K x K SPD block in the "
                                             "top-K Hessian eigenvectors, O(d K) memory per certificate; 0 = the "
                                             "full d x d path")


class RDDRS(DataDependentMethod):
    """``--method rddrs``: DDS, then a full SPD scale by Riemannian ascent (seed 003 eq. 5-6); memory."""

    name = "rddrs"
    settings_type = RDDRSSettings
    keywords = {**DataDependentMethod.keywords, "steps": "rddrs_steps", "lr": "rddrs_lr", "kappa": "rddrs_kappa"}

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """``--rddrs-rank K`` needs ``K <= d`` (checked before any sampling)."""
        super().check_input_shape(shape)
        d = int(torch.tensor(shape).prod()) if shape else 1
        if self.settings.rddrs_rank > d:
            raise ValueError(f"rddrs_rank (--rddrs-rank) must be 0 (the full-matrix path) or an integer in "
                             f"[1, d = {d}] (the input's dimension), got {self.settings.rddrs_rank}")

    def choose_lowrank(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]) -> list[Choice]:
        """DDS, the top-K eigenvectors, the low-rank Riemannian ascent (:mod:`smoothcert.methods.lowrank_rddrs`)."""
        s, k, d = self.settings, self.settings.rddrs_rank, int(x[0].numel())
        iso = self.dds_stage(ctx, x, indices)
        floor = torch.where(iso.finite, iso.params, torch.full_like(iso.params, self.sigma)).double()
        basis, _, finite = top_eigenvectors(ctx.model, x, k, generators=ctx.generators(indices, "hessian-lowrank"))
        result = optimize_rddrs_lowrank(ctx.model, x, floor, basis, generators=ctx.generators(indices, "optimize-rddrs"),
                                        steps=s.rddrs_steps, lr=s.rddrs_lr, samples=s.rddrs_samples,
                                        kappa=s.rddrs_kappa, gap=s.opt_gap, classes=iso.classes,
                                        max_batch=self.opt_batch(ctx, x, s.rddrs_samples))
        theta, m = split_params(result.params, d, k)
        choices = []
        for i in range(x.shape[0]):
            if fallback_reason(i, iso, result):
                choices.append(Choice(self.base_noise(), {}, fallback_reason(i, iso, result)))
                continue
            ev, rot = torch.linalg.eigh(0.5 * (m[i] + m[i].T))
            noise = LowRankGaussian(theta[i], basis[i] @ rot, ev - 1.0)
            choices.append(Choice(noise, {"scale_iso": float(iso.params[i])}))
        return choices

    def choose(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]) -> list[Choice]:
        s = self.settings
        if s.rddrs_rank:
            self.check_input_shape(tuple(x.shape[1:]))
            return self.choose_lowrank(ctx, x, indices)
        iso = self.dds_stage(ctx, x, indices)
        floor = torch.where(iso.finite, iso.params, torch.full_like(iso.params, self.sigma)).double()
        result = optimize_rddrs(ctx.model, x, floor, generators=ctx.generators(indices, "optimize-rddrs"),
                                steps=s.rddrs_steps, lr=s.rddrs_lr, samples=s.rddrs_samples, kappa=s.rddrs_kappa,
                                gap=s.opt_gap, classes=iso.classes,
                                max_batch=self.opt_batch(ctx, x, s.rddrs_samples))
        choices = []
        for i in range(x.shape[0]):
            if fallback_reason(i, iso, result):
                choices.append(Choice(self.base_noise(), {}, fallback_reason(i, iso, result)))
                continue
            choices.append(Choice(FullGaussian(result.params[i]), {"scale_iso": float(iso.params[i])}))
        return choices
