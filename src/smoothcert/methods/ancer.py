"""ANCER: anisotropic certification via sample-wise volume maximization (Eiras et al.; seed 000 section 3.3).

Per input, a diagonal noise ``N(0, diag(theta)^2)`` certifies the ellipsoid ``{||delta / theta||_2 <= gap}``
(eq. 3.12). ``theta`` starts at the isotropic DDS scale ``theta_iso = sigma_x`` (eq. 3.7) and maximizes, by
Adam (learning rate 0.04, 100 steps, 100 samples per step), the penalized proxy radius of eq. 3.15 as in the
public code:

    gap(theta) * geomean(theta) + kappa * gap(theta) * min_i theta_i,   kappa = 2,

(an input whose gap at the start is <= 0 keeps ``theta_iso``: :func:`~smoothcert.methods.optimize.started_gap`),
subject to a constraint meant to keep the isotropic DDS ball inside the ellipsoid (seed 000 eq. 3.13-3.15), in
one of two forms (``constraint=``):

- ``"elementwise"`` (default, the public code): ``theta >= theta_iso`` coordinate by coordinate, projected after
  every step (in place). Every semi-axis is then at least ``theta_iso * gap(theta)``, which holds the isotropic
  ball ``theta_iso * gap(theta_iso)`` only while ``gap(theta) >= gap(theta_iso)`` (stretching ``theta`` usually
  lowers the gap: on a test ellipse the smallest semi-axis ended at 0.96 of the isotropic radius);
- ``"radius"`` (seed 000 eq. 3.15 as printed): ``min_i theta_i * gap(theta) >= r_iso``, the certified
  ellipsoid's smallest semi-axis at least the isotropic radius ``r_iso = theta_iso * gap(theta_iso)``. Raising
  ``theta`` cannot restore it (``theta_iso`` maximizes ``sigma * gap(sigma)`` along the isotropic ray, so beyond it
  the radius falls: a projection ``theta >= r_iso / gap`` ran away to ``gap < 0`` in tests), so the iterates are
  checked instead: each step's samples estimate ``gap`` at the current ``theta`` (``r_iso`` from the first
  step's, at ``theta_iso``, where it holds with equality); a ``theta`` that violates it is replaced by the last one
  that held, and the result is the last ``theta`` that held. ``theta`` stays ``>= theta_iso / 100``.

``geomean`` is computed in log space (the product underflows for d = 784).

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
from smoothcert.methods.optimize import (FailureLog, OptimizationResult, check_optimizer_arguments, class_slots,
                                         classes_of, expand_rows, fallback_reason, finish_optimization, mean_probs,
                                         noise_family, objective_and_gradient, objective_gap, started_gap)
from smoothcert.settings import choice, integer, number

__all__ = ["optimize_ancer", "ANCER", "ANCERSettings", "anisotropic_objective", "CONSTRAINTS"]

#: The forms of ANCER's constraint (see the module docstring).
CONSTRAINTS = ("elementwise", "radius")


def anisotropic_objective(gap: torch.Tensor, theta: torch.Tensor, kappa: float) -> torch.Tensor:
    """``gap * exp(mean(log theta)) + kappa * gap * min(theta)`` per row (seed 000 eq. 3.15, penalized)."""
    return gap * geometric_mean(theta, dim=1) + kappa * gap * theta.min(dim=1).values


def check_constraint(constraint: str) -> str:
    if constraint not in CONSTRAINTS:
        raise ValueError(f"the ANCER constraint must be one of {', '.join(CONSTRAINTS)}, got {constraint!r}")
    return constraint


def _project(theta: torch.Tensor, low: torch.Tensor | None, high: torch.Tensor | None) -> torch.Tensor:
    return theta if low is None and high is None else torch.clamp(theta, min=low, max=high)


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
    family="gaussian",
    gap: str = "pa",
    constraint: str = "elementwise",
    classes: torch.Tensor | None = None,
    max_batch: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> OptimizationResult:
    """Adam on the anisotropic objective for every input of ``x`` (B, *shape) at once; returns (B, d) ``theta``.

    ``theta0``: start (``theta_iso``), scalar / (B,) / (B, d). ``lower`` (default ``theta0``, ANCER's
    ``theta >= theta_iso``; with ``constraint="radius"`` the bound ``r_iso / gap(theta)`` replaces that
    default) and ``upper`` (default none): the box ``theta`` is projected onto after every step (in place under
    ``no_grad``; the parameter is never rebound, its gradient is assigned afresh every step). ``basis``
    (B, d, d), orthonormal columns: the noise is ``U diag(theta) w`` (RANCER) instead of ``diag(theta) w``.
    ``callback(step, theta)`` sees ``theta`` after every projected update.
    """
    check_optimizer_arguments(x, generators, steps, lr, samples, family, gap)
    radius_form = check_constraint(constraint) == "radius"
    family = noise_family(family)
    b, shape = x.shape[0], tuple(x.shape[1:])
    d = int(torch.tensor(shape).prod()) if shape else 1
    x = x.detach().float()
    theta = expand_rows(theta0, b, d, x.device).clone()
    if not bool(torch.isfinite(theta).all()) or bool((theta <= 0).any()):
        raise ValueError("the starting theta (theta_iso) must be finite and > 0")
    iso = theta.min(dim=1).values  # the isotropic scale whose ball the ellipsoid must hold
    low = None if lower is None else expand_rows(lower, b, d, x.device)
    if low is None:
        low = (iso / 100)[:, None].expand(b, d) if radius_form else theta.clone()
    high = None if upper is None else expand_rows(upper, b, d, x.device)
    theta = _project(theta, low, high).requires_grad_(True)
    rotation = None
    if basis is not None:
        if basis.shape != (b, d, d):
            raise ValueError(f"basis must be (B, d, d) = ({b}, {d}, {d}), got {tuple(basis.shape)}")
        rotation = basis.detach().to(device=x.device, dtype=torch.float32).transpose(1, 2).contiguous()
    optimizer = torch.optim.Adam([theta], lr=lr)
    failures = FailureLog(b, "ancer", x.device)
    history = []
    slots, gate = class_slots(classes, b, x.device), class_slots(None, b, x.device)
    gaps = torch.zeros(b, device=x.device)  # each step's certified gap (the radius form's check)
    r_iso, held = torch.zeros(b, device=x.device), theta.detach().clone()  # held: the last theta that held

    def perturb(w: torch.Tensor, rows: slice) -> torch.Tensor:
        n, m = w.shape[:2]
        scaled = w.reshape(n, m, d) * theta[rows, None, :]
        if rotation is not None:
            scaled = torch.bmm(scaled, rotation[rows])  # rows: (U diag(theta) w)^T
        return scaled.reshape(n, m, *shape)

    def objective(probs: torch.Tensor, rows: slice) -> torch.Tensor:
        g = started_gap(gate, objective_gap(probs, classes_of(slots, probs, rows), family, gap), rows)
        gaps[rows] = g.detach()
        return anisotropic_objective(g, theta[rows], kappa)

    for step in range(steps):
        w = family.standard_draws(generators, samples, shape, x.device)
        obj, (grad,) = objective_and_gradient(model, x, w, perturb, objective, [theta], max_batch)
        failures.check(step, "objective gap * (geomean + kappa min)(theta)", obj)
        ok = failures.check(step, "gradient of the objective", grad)
        history.append(obj)
        optimizer.zero_grad(set_to_none=True)
        theta.grad = torch.where(ok[:, None], -grad, torch.zeros_like(grad))  # Adam minimizes
        with torch.no_grad():
            if radius_form:
                if step == 0:
                    r_iso.copy_(theta.min(dim=1).values * gaps)  # at theta_iso: theta_iso * gap(theta_iso)
                holds = (theta.min(dim=1).values * gaps >= r_iso)[:, None]
                held.copy_(torch.where(holds, theta, held))
            optimizer.step()
            theta.copy_(_project(theta, low, high))
            if radius_form:
                theta.copy_(torch.where(holds, theta, held))  # a theta that violated it: back to the last that held
        if callback is not None:
            callback(step, theta.detach())
    result = held if radius_form and steps else theta
    return finish_optimization(result, failures, history, slots, lambda: mean_probs(
        model, x, family.standard_draws(generators, samples, shape, x.device), perturb, max_batch))


@dataclass(frozen=True)
class ANCERSettings(DataDependentSettings):
    """The DDS settings, then ANCER's Adam stage (seed 000 eq. 3.15; also RANCER's)."""

    ancer_steps: int = integer(100, low=0, help="Adam steps of ANCER / RANCER")
    ancer_lr: float = number(0.04, low=0.0, help="Adam learning rate of ANCER / RANCER")
    kappa: float = number(2.0, low=0.0, help="weight of the min-scale term in ANCER / RANCER's objective")
    ancer_constraint: str = choice("elementwise", CONSTRAINTS,
                                   help="ANCER / RANCER constraint: elementwise = theta >= theta_iso (the public "
                                        "code); radius = min(theta) gap >= the isotropic radius (seed 000 eq. 3.15)")


class ANCER(DataDependentMethod):
    """``--method ancer``: DDS, then per-input diagonal theta >= theta_iso (seed 000 eq. 3.15), with memory."""

    name = "ancer"
    settings_type = ANCERSettings
    keywords = {**DataDependentMethod.keywords, "steps": "ancer_steps", "lr": "ancer_lr",
                "constraint": "ancer_constraint"}

    def optimize(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]
                 ) -> tuple[OptimizationResult, OptimizationResult]:
        """(DDS result, ANCER result) for the batch, each stage from its own optimization streams."""
        s = self.settings
        iso = self.dds_stage(ctx, x, indices)
        result = optimize_ancer(ctx.model, x, iso.params, generators=ctx.generators(indices, "optimize-ancer"),
                                steps=s.ancer_steps, lr=s.ancer_lr, samples=s.opt_samples, kappa=s.kappa,
                                family=self.family, gap=s.opt_gap, constraint=s.ancer_constraint,
                                classes=iso.classes, max_batch=self.opt_batch(ctx, x))
        return iso, result

    def make_noise(self, theta: torch.Tensor):
        if self.family == "uniform":
            return UniformDiagonal(theta.double())
        return DiagonalGaussian(theta.double())

    def choose(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]) -> list[Choice]:
        iso, result = self.optimize(ctx, x, indices)
        choices = []
        for i in range(x.shape[0]):
            if fallback_reason(i, iso, result):
                choices.append(Choice(self.base_noise(), {}, fallback_reason(i, iso, result)))
                continue
            theta = result.params[i].reshape(x.shape[1:])
            choices.append(Choice(self.make_noise(theta), {"scale_iso": float(iso.params[i])}))
        return choices
