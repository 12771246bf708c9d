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
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch

from smoothcert.noise.gaussian import FullGaussian, IsotropicGaussian
from smoothcert.methods.base import RunContext, argument_group_once
from smoothcert.methods.datadependent import Choice, DataDependentMethod
from smoothcert.methods.optimize import (FailureLog, OptimizationResult, check_optimizer_arguments,
                                         check_stage, class_slots, classes_of, fallback_reason, finish_optimization,
                                         mean_probs, objective_and_gradient, objective_gap,
                                         started_gap)

__all__ = ["optimize_rddrs", "spd_exp", "RDDRS"]


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
#: One ascent step stretches ``C`` by at most ``exp(RDDRS_MAX_LOG_STEP)`` along any direction (:func:`_ascent_step`).
RDDRS_MAX_LOG_STEP = 0.1


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
        geo = torch.exp(torch.log(values).mean(dim=1))  # P(C)
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


class RDDRS(DataDependentMethod):
    """``--method rddrs``: DDS, then a full SPD scale by Riemannian ascent (seed 003 eq. 5-6); memory."""

    name = "rddrs"

    def __init__(self, sigma: float, *, steps: int = 100, lr: float = 1.0, rddrs_samples: int = 1000,
                 kappa: float = 1e-6, **common: Any):
        super().__init__(sigma, **common)
        check_stage(steps, lr, kappa)
        if isinstance(rddrs_samples, bool) or not isinstance(rddrs_samples, int) or rddrs_samples < 1:
            raise ValueError(f"--rddrs-samples must be an integer >= 1, got {rddrs_samples!r}")
        self.steps, self.lr, self.rddrs_samples, self.kappa = steps, float(lr), rddrs_samples, float(kappa)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        g = argument_group_once(parser, "rddrs")
        if g is None:
            return
        g.add_argument("--rddrs-steps", type=int, default=100, help="Riemannian ascent steps (default 100)")
        g.add_argument("--rddrs-lr", type=float, default=1.0, help="step size gamma (default 1)")
        g.add_argument("--rddrs-samples", type=int, default=1000,
                       help="Monte Carlo samples per step for the gradient of G (default 1000; the paper: 20000)")
        g.add_argument("--rddrs-kappa", type=float, default=1e-6, help="weight of the min-eigenvalue term (1e-6)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RDDRS":
        return cls(args.sigma, steps=args.rddrs_steps, lr=args.rddrs_lr, rddrs_samples=args.rddrs_samples,
                   kappa=args.rddrs_kappa, **cls.common_kwargs(args))

    def stage_config(self) -> dict[str, Any]:
        return {"rddrs_steps": self.steps, "rddrs_lr": self.lr, "rddrs_samples": self.rddrs_samples,
                "rddrs_kappa": self.kappa}

    def choose(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]) -> list[Choice]:
        iso = self.dds_stage(ctx, x, indices)
        floor = torch.where(iso.finite, iso.params, torch.full_like(iso.params, self.sigma)).double()
        result = optimize_rddrs(ctx.model, x, floor, generators=ctx.generators(indices, "optimize-rddrs"),
                                steps=self.steps, lr=self.lr, samples=self.rddrs_samples, kappa=self.kappa,
                                gap=self.gap, classes=iso.classes, max_batch=self.opt_batch(ctx, x, self.rddrs_samples))
        choices = []
        for i in range(x.shape[0]):
            if fallback_reason(i, iso, result):
                choices.append(Choice(self.base_noise(), {}, fallback_reason(i, iso, result)))
                continue
            choices.append(Choice(FullGaussian(result.params[i]), {"scale_iso": float(iso.params[i])}))
        return choices
