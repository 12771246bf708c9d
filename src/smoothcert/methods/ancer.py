"""ANCER: anisotropic certification via sample-wise volume maximization (Eiras et al.; seed 000 section 3.3).

Per input, a diagonal noise ``N(0, diag(theta)^2)`` certifies the ellipsoid ``{||delta / theta||_2 <= gap}``
(eq. 3.12). ``theta`` starts at the isotropic DDS scale ``theta_iso = sigma_x`` (eq. 3.7) and maximizes, by
Adam (learning rate 0.04, 100 steps, 100 samples per step), the penalized proxy radius of eq. 3.15 as in the
public code:

    gap(theta) * geomean(theta) + kappa * gap(theta) * min_i theta_i,   kappa = 2,

subject to ``theta >= theta_iso`` elementwise (projected after every step, in place, so the isotropic DDS
ball stays inside the ellipsoid). ``geomean`` is computed in log space (the product underflows for d = 784).

``--norm l1``: uniform noise ``U[-lambda_i, lambda_i]`` per coordinate (ANCER's l1 version) with the l1
certificate ``{||delta / lambda||_1 <= 2 p_A - 1}`` (:mod:`smoothcert.uniform`), ``lambda`` starting at the
isotropic DDS half-width (itself starting at ``sqrt(3) sigma``).

:func:`optimize_ancer` also runs RANCER's optimization: give it a ``basis`` U (noise ``U diag(theta) w``) and
a clipping window ``[lower, upper]`` (seed 000 eq. 4.8).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from smoothcert.geometry.linalg import geometric_mean
from smoothcert.noise.gaussian import DiagonalGaussian
from smoothcert.noise.uniform import UniformDiagonal
from smoothcert.methods.base import RunContext
from smoothcert.methods.datadependent import Choice, DataDependentMethod, DataDependentSettings
from smoothcert.methods.optimize import (OptimizationResult, check_optimizer_arguments, class_slots, classes_of, expand_rows, finish_optimization, mean_probs, objective_and_gradient, objective_gap, rows_finite, standard_draws)
from smoothcert.settings import integer, number

__all__ = ["optimize_ancer", "ANCER", "ANCERSettings", "anisotropic_objective"]


def anisotropic_objective(gap: torch.Tensor, theta: torch.Tensor, kappa: float) -> torch.Tensor:
    """``gap * exp(mean(log theta)) + kappa * gap * min(theta)`` per row (seed 000 eq. 3.15, penalized)."""
    return gap * geometric_mean(theta, dim=1) + kappa * gap * theta.min(dim=1).values


def optimize_ancer(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    theta0: float | torch.Tensor,
    *,
    generators: Sequence[torch.Generator | None],
    lower: float | torch.Tensor | None = None,
    upper: float | torch.Tensor | None = None,
    basis: torch.Tensor | None = None,
    steps: int = 100,
    lr: float = 0.04,
    samples: int = 100,
    kappa: float = 2.0,
    family: str = "gaussian",
    gap: str = "pa",
    classes: torch.Tensor | None = None,
    max_batch: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> OptimizationResult:
    """Adam on the anisotropic objective for every input of ``x`` (B, *shape) at once; returns (B, d) ``theta``.

    ``theta0``: start, scalar / (B,) / (B, d). ``lower`` (default ``theta0``, ANCER's ``theta >= theta_iso``)
    and ``upper`` (default none): the box ``theta`` is projected onto after every step (in place under
    ``no_grad``; the parameter is never rebound, its gradient is assigned afresh every step). ``basis``
    (B, d, d), orthonormal columns: the noise is ``U diag(theta) w`` (RANCER) instead of ``diag(theta) w``.
    ``callback(step, theta)`` sees ``theta`` after every projected update.
    """
    check_optimizer_arguments(x, generators, steps, lr, samples, family, gap)
    b, shape = x.shape[0], tuple(x.shape[1:])
    d = int(torch.tensor(shape).prod()) if shape else 1
    x = x.detach().float()
    theta = expand_rows(theta0, b, d, x.device).clone()
    if not bool(torch.isfinite(theta).all()) or bool((theta <= 0).any()):
        raise ValueError("the starting theta (theta_iso) must be finite and > 0")
    low = theta.clone() if lower is None else expand_rows(lower, b, d, x.device)
    high = None if upper is None else expand_rows(upper, b, d, x.device)
    theta = torch.clamp(theta, min=low, max=high).requires_grad_(True)
    rotation = None
    if basis is not None:
        if basis.shape != (b, d, d):
            raise ValueError(f"basis must be (B, d, d) = ({b}, {d}, {d}), got {tuple(basis.shape)}")
        rotation = basis.detach().to(device=x.device, dtype=torch.float32).transpose(1, 2).contiguous()
    optimizer = torch.optim.Adam([theta], lr=lr)
    finite = torch.ones(b, dtype=torch.bool, device=x.device)
    history = []
    slots = class_slots(classes, b, x.device)

    def perturb(w: torch.Tensor, rows: slice) -> torch.Tensor:
        n, m = w.shape[:2]
        scaled = w.reshape(n, m, d) * theta[rows, None, :]
        if rotation is not None:
            scaled = torch.bmm(scaled, rotation[rows])  # rows: (U diag(theta) w)^T
        return scaled.reshape(n, m, *shape)

    def objective(probs: torch.Tensor, rows: slice) -> torch.Tensor:
        gaps = objective_gap(probs, classes_of(slots, probs, rows), family, gap)
        return anisotropic_objective(gaps, theta[rows], kappa)

    for step in range(steps):
        w = standard_draws(generators, samples, shape, family, x.device)
        obj, (grad,) = objective_and_gradient(model, x, w, perturb, objective, [theta], max_batch)
        finite &= rows_finite(obj, grad)
        history.append(obj)
        optimizer.zero_grad(set_to_none=True)
        theta.grad = torch.where(finite[:, None], -grad, torch.zeros_like(grad))  # Adam minimizes
        optimizer.step()
        with torch.no_grad():
            theta.copy_(torch.clamp(theta, min=low, max=high))
        if callback is not None:
            callback(step, theta.detach())
    return finish_optimization(theta, finite, history, slots, lambda: mean_probs(
        model, x, standard_draws(generators, samples, shape, family, x.device), perturb, max_batch))


@dataclass(frozen=True)
class ANCERSettings(DataDependentSettings):
    """The DDS settings, then ANCER's Adam stage (seed 000 eq. 3.15; also RANCER's)."""

    ancer_steps: int = integer(100, low=0, help="Adam steps of ANCER / RANCER")
    ancer_lr: float = number(0.04, low=0.0, help="Adam learning rate of ANCER / RANCER")
    kappa: float = number(2.0, low=0.0, help="weight of the min-scale term in ANCER / RANCER's objective")


class ANCER(DataDependentMethod):
    """``--method ancer``: DDS, then per-input diagonal theta >= theta_iso (seed 000 eq. 3.15), with memory."""

    name = "ancer"
    settings_type = ANCERSettings
    keywords = {**DataDependentMethod.keywords, "steps": "ancer_steps", "lr": "ancer_lr"}

    def optimize(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]
                 ) -> tuple[OptimizationResult, OptimizationResult]:
        """(DDS result, ANCER result) for the batch, each stage from its own optimization streams."""
        s = self.settings
        iso = self.dds_stage(ctx, x, indices)
        result = optimize_ancer(ctx.model, x, iso.params, generators=ctx.generators(indices, "optimize-ancer"),
                                steps=s.ancer_steps, lr=s.ancer_lr, samples=s.opt_samples, kappa=s.kappa,
                                family=self.family, gap=s.opt_gap, classes=iso.classes,
                                max_batch=self.opt_batch(ctx, x))
        return iso, result

    def make_noise(self, theta: torch.Tensor):
        if self.family == "uniform":
            return UniformDiagonal(theta.double())
        return DiagonalGaussian(theta.double())

    def choose(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]) -> list[Choice]:
        iso, result = self.optimize(ctx, x, indices)
        choices = []
        for i in range(x.shape[0]):
            if not (bool(iso.finite[i]) and bool(result.finite[i])):
                choices.append(Choice(self.base_noise(), {}, "non-finite optimization"))
                continue
            theta = result.params[i].reshape(x.shape[1:])
            choices.append(Choice(self.make_noise(theta), {"scale_iso": float(iso.params[i])}))
        return choices
