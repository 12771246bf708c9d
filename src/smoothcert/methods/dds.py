"""Data-dependent isotropic smoothing, DDS (Alfarra et al.; seed 000 section 3.2, eq. 3.6-3.7).

Per input, the noise level ``sigma_x`` maximizes the reparameterized certified radius

    R(sigma) = sigma * gap(E_w[softmax f(x + sigma w)]),   w ~ N(0, I)   (eq. 3.7),

by plain gradient ascent from ``sigma_0 = --sigma`` (learning rate 0.04, up to 900 steps, 100 samples per
step; seed 000 / public code), with ``gap = Phi^-1(p_A)`` of the class ``c_A`` on top at ``sigma_0`` (or the
published ``(Phi^-1(p_A) - Phi^-1(p_B)) / 2``, ``--opt-gap top2``). The smoothed classifier then uses
``N(0, sigma_x^2 I)`` and is certified like Cohen's on fresh samples; memory-based certification makes the
per-input choice sound across inputs (:mod:`.datadependent`). ``--norm l1`` runs the same ascent for the
half-width ``lambda`` of uniform noise ``U[-lambda, lambda]^d`` (start ``sqrt(3) sigma``) with the l1 gap
``2 p_A - 1``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.noise.uniform import UniformDiagonal
from smoothcert.methods.base import RunContext
from smoothcert.methods.datadependent import (Choice, DataDependentMethod, OptimizationResult, check_optimizer_arguments, class_slots, classes_of, finish_optimization, mean_probs, objective_and_gradient, objective_gap, rows_finite, standard_draws)

__all__ = ["optimize_dds", "DDS"]


def optimize_dds(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    scale0: float | torch.Tensor,
    *,
    generators: Sequence[torch.Generator | None],
    steps: int = 900,
    lr: float = 0.04,
    samples: int = 100,
    family: str = "gaussian",
    gap: str = "pa",
    min_scale: float | None = None,
    classes: torch.Tensor | None = None,
    max_batch: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> OptimizationResult:
    """Gradient ascent on ``scale * gap`` for every input of ``x`` (B, *shape) at once (seed 000 eq. 3.7).

    ``scale0``: the start (sigma of Gaussian noise, half-width of uniform noise), scalar or (B,). The scale
    stays >= ``min_scale`` (default ``scale0 / 100``). ``generators``: one per input (the optimization stream).
    ``classes``: the class ``c_A`` per input (default: the top class of the averaged softmax at the start).
    ``callback(step, scale)`` sees the scales after every update. Returns the (B,) scales.
    """
    check_optimizer_arguments(x, generators, steps, lr, samples, family, gap)
    b, shape = x.shape[0], tuple(x.shape[1:])
    x = x.detach().float()
    scale = torch.as_tensor(scale0, dtype=torch.float32, device=x.device).expand(b).clone()
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise ValueError("the starting scale (sigma_0, or the uniform half-width) must be finite and > 0")
    floor = (scale / 100.0) if min_scale is None else torch.full_like(scale, float(min_scale))
    scale.requires_grad_(True)
    finite = torch.ones(b, dtype=torch.bool, device=x.device)
    history = []
    slots = class_slots(classes, b, x.device)

    def perturb(w: torch.Tensor, rows: slice) -> torch.Tensor:
        return w * scale[rows].view(-1, *([1] * (w.ndim - 1)))

    def objective(probs: torch.Tensor, rows: slice) -> torch.Tensor:
        return scale[rows] * objective_gap(probs, classes_of(slots, probs, rows), family, gap)

    for step in range(steps):
        w = standard_draws(generators, samples, shape, family, x.device)
        obj, (grad,) = objective_and_gradient(model, x, w, perturb, objective, [scale], max_batch)
        finite &= rows_finite(obj, grad)
        history.append(obj)
        with torch.no_grad():
            scale.add_(torch.where(finite, lr * grad, torch.zeros_like(grad)))
            scale.copy_(torch.maximum(scale, floor))
        if callback is not None:
            callback(step, scale.detach())
    return finish_optimization(scale, finite, history, slots, lambda: mean_probs(
        model, x, standard_draws(generators, samples, shape, family, x.device), perturb, max_batch))


class DDS(DataDependentMethod):
    """``--method dds``: per-input isotropic sigma (seed 000 eq. 3.7), certified with memory."""

    name = "dds"
    norms = ("l2", "l1")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DDS":
        return cls(args.sigma, **cls.common_kwargs(args))

    def choose(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]) -> list[Choice]:
        result = self.dds_stage(ctx, x, indices)
        choices = []
        for scale, ok in zip(result.params.tolist(), result.finite.tolist()):
            if not ok:
                choices.append(Choice(self.base_noise(), {}, "non-finite optimization"))
                continue
            if self.family == "uniform":
                noise = UniformDiagonal.isotropic(scale)
            else:
                noise = IsotropicGaussian(scale)
            choices.append(Choice(noise, {"scale_iso": scale}))
        return choices
