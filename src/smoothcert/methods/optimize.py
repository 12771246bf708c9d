"""The optimizers' shared mathematics: reparameterized objectives, batched gradients, and the DDS stage.

Every data-dependent method optimizes a smoothing distribution per input by stochastic gradient ascent on a
reparameterized objective: the softmax probabilities of the base classifier, averaged over noise
``eps(params, w)`` with ``w`` drawn from a fixed standard distribution, so the gradient flows to the noise
parameters (seed 000 eq. 3.7). Probabilities (never raw logits) are clamped to [0.001, 0.999] before
``Phi^-1``. All inputs of a batch are optimized by one tensor program over ``(B, samples, d)``; each input draws
from its own ``"optimize-<stage>"`` stream, never from the certification streams.

:func:`optimize_dds` is the isotropic stage every method starts from (DDS itself, and the ``theta_iso`` of
ANCER, RANCER and RDDRS).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "FAMILIES", "GAPS", "CLAMP", "NotDifferentiable", "check_optimizer_arguments", "OptimizationResult",
    "standard_draws", "objective_gap", "objective_and_gradient", "mean_probs", "class_slots", "classes_of",
    "finish_optimization", "rows_finite", "expand_rows", "cpu_pass_size", "CPU_PASS_VALUES", "optimize_dds", "check_stage",
]

#: Noise families the optimizers reparameterize: ``eps = scale * w`` with ``w ~ N(0, 1)`` or ``U[-1, 1]``.
FAMILIES = ("gaussian", "uniform")
#: Objective gaps: ``"pa"`` = the certificate's own gap (``Phi^-1(p_A)``, or ``2 p_A - 1`` for uniform noise);
#: ``"top2"`` = the published two-class form (``(Phi^-1(p_A) - Phi^-1(p_B)) / 2``, or ``p_A - p_B``).
GAPS = ("pa", "top2")
#: Probabilities are clamped to this interval before the gap (seed 000 / ANCER public code).
CLAMP = (0.001, 0.999)


#: ``perturb(w_rows, rows)``: standard draws (n, m, ...) of the inputs ``rows`` -> their perturbations.
Perturb = Callable[[torch.Tensor, slice], torch.Tensor]
#: ``objective(mean_probs, rows)``: (n, K) averaged softmax of the inputs ``rows`` -> their objectives (n,).
Objective = Callable[[torch.Tensor, slice], torch.Tensor]


class NotDifferentiable(RuntimeError):
    """The base classifier's output does not depend differentiably on the noise parameters."""


@dataclass
class OptimizationResult:
    """Outcome of a batched optimization.

    ``params``: the optimized parameters, one row per input; ``classes``: the class ``c_A`` whose probability
    was optimized (the top class of the averaged softmax at the initial noise, seed 000 eq. 3.6);
    ``objective``: (steps, B) objective estimates, each from the samples of its step, before that step's update;
    ``finite``: False where the optimization produced a non-finite value (that input must fall back).
    """

    params: torch.Tensor
    classes: torch.Tensor
    objective: torch.Tensor
    finite: torch.Tensor


def check_optimizer_arguments(x: torch.Tensor, generators: Sequence, steps: int, lr: float, samples: int,
                              family: str = "gaussian", gap: str = "pa") -> None:
    """One clear error for a bad argument of an optimizer (shared by DDS, ANCER / RANCER and RDDRS)."""
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.ndim < 2 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty floating-point batch (B, *input_shape), pixels in [0, 1]")
    if len(generators) != x.shape[0]:
        raise ValueError(f"got {len(generators)} generators for {x.shape[0]} inputs (one per input)")
    for label, value, low in (("steps", steps, 0), ("samples", samples, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"the learning rate must be a finite number >= 0, got {lr!r}")
    if family not in FAMILIES:
        raise ValueError(f"noise family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if gap not in GAPS:
        raise ValueError(f"objective gap must be one of {', '.join(GAPS)}, got {gap!r}")


def standard_draws(generators: Sequence[torch.Generator | None], samples: int, shape: Sequence[int],
                   family: str = "gaussian", device: torch.device | str = "cpu") -> torch.Tensor:
    """``(B, samples, *shape)`` float32 standard draws, input ``i`` from ``generators[i]``.

    ``family`` ``"gaussian"``: ``N(0, 1)``; ``"uniform"``: ``U[-1, 1]``. One call per input (not per sample), so
    an input's draws do not depend on which inputs share its batch.
    """
    if family not in FAMILIES:
        raise ValueError(f"noise family must be one of {', '.join(FAMILIES)}, got {family!r}")
    size = (samples, *shape)
    if family == "gaussian":
        draws = [torch.randn(size, generator=g, device=device) for g in generators]
    else:
        draws = [torch.rand(size, generator=g, device=device).mul_(2).sub_(1) for g in generators]
    return torch.stack(draws)


def objective_gap(probs: torch.Tensor, classes: torch.Tensor, family: str = "gaussian", form: str = "pa"
                  ) -> torch.Tensor:
    """Differentiable gap of averaged softmax probabilities ``probs`` (B, K) for the classes ``c_A`` (B,).

    Gaussian: ``Phi^-1(p_A)`` (``form="pa"``, the gap the certificate uses, seed 000 eq. 3.3 with
    ``p_B = 1 - p_A``) or ``(Phi^-1(p_A) - Phi^-1(p_B)) / 2`` (``"top2"``, seed 000 eq. 3.6-3.7). Uniform (l1):
    ``2 p_A - 1`` or ``p_A - p_B`` (Yang et al.'s l1 radius over the half-width). Probabilities are clamped
    to [0.001, 0.999] first.
    """
    if form not in GAPS:
        raise ValueError(f"objective gap must be one of {', '.join(GAPS)}, got {form!r}")
    p_a = probs.gather(1, classes[:, None])[:, 0].clamp(*CLAMP)
    if form == "pa":
        return torch.special.ndtri(p_a) if family == "gaussian" else 2 * p_a - 1
    others = probs.scatter(1, classes[:, None], -math.inf).max(dim=1).values.clamp(*CLAMP)
    if family == "gaussian":
        return 0.5 * (torch.special.ndtri(p_a) - torch.special.ndtri(others))
    return p_a - others


def _prob_sum(model: Callable, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Sum over samples of ``softmax(f(x + eps))``: ``eps`` (B, m, *shape) -> (B, K)."""
    b, m = eps.shape[:2]
    logits = model((x.unsqueeze(1) + eps).reshape(b * m, *x.shape[1:]))
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != b * m:
        raise ValueError(f"the base classifier must return (B, K) scores, got {getattr(logits, 'shape', logits)}")
    return torch.softmax(logits.float(), dim=1).view(b, m, -1).sum(dim=1)


def _differentiable(probs: torch.Tensor) -> torch.Tensor:
    if not probs.requires_grad:
        raise NotDifferentiable("the base classifier's output does not depend differentiably on its input")
    return probs


def _grads(output: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if not output.requires_grad:
        raise NotDifferentiable("the base classifier's output does not depend differentiably on the noise")
    grads = torch.autograd.grad(output, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


#: On a CPU, a forward and backward pass whose noisy inputs hold about 200,000 values (256 MNIST digits) keeps the
#: activations in cache, while passes of 1,000 digits ran up to 2x slower per sample (benchmarks/optimization.py,
#: MNIST CNN): the optimizers' default pass there (:meth:`DataDependentMethod.opt_batch`).
CPU_PASS_VALUES = 256 * 784


def cpu_pass_size(input_values: int) -> int:
    """Noisy inputs per optimizer pass on a CPU for inputs of ``input_values`` values (at least 1)."""
    return max(1, CPU_PASS_VALUES // max(1, input_values))


def objective_and_gradient(
    model: Callable, x: torch.Tensor, w: torch.Tensor, perturb: Perturb, objective: Objective,
    params: Sequence[torch.Tensor], max_batch: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-input objective ``objective(mean_s softmax(f(x + perturb(w_s))))`` (B,) and the gradient of its sum.

    ``w`` (B, S, ...) are the standard draws; ``perturb(w_rows, rows)`` maps the draws of the inputs ``rows``
    (a slice) to perturbations (n, m, *shape) through the parameters ``params``; ``objective(mean, rows)``
    gives those inputs' objectives. At most ``max_batch`` noisy inputs go through the model at once: groups of
    whole inputs (one tensor program per group, ``max_batch // S`` inputs), and when one input's ``S`` samples
    exceed it, a first pass computes its mean probabilities without a graph and a second pass back-propagates
    ``d objective / d mean`` chunk by chunk (the same gradient, bounded memory). Inputs are independent, so
    the gradient of the sum holds each input's own gradient.
    """
    b, s = w.shape[:2]
    group, chunk = _plan(b, s, max_batch)
    grads = [torch.zeros_like(p) for p in params]
    values = []
    with torch.enable_grad():
        for r in range(0, b, group):
            rows = slice(r, min(b, r + group))
            if chunk >= s:
                obj = objective(_differentiable(_prob_sum(model, x[rows], perturb(w[rows], rows))) / s, rows)
                parts = _grads(obj.sum(), params)
            else:
                mean = mean_probs(model, x[rows], w[rows], lambda v, _: perturb(v, rows), max_batch)
                obj = objective(mean.requires_grad_(True), rows)
                direct = torch.autograd.grad(obj.sum(), [mean, *params], allow_unused=True)
                parts = [torch.zeros_like(p) if g is None else g for p, g in zip(params, direct[1:])]
                for i in range(0, s, chunk):
                    probs = _differentiable(_prob_sum(model, x[rows], perturb(w[rows, i : i + chunk], rows)))
                    for acc, g in zip(parts, _grads((probs * direct[0]).sum() / s, params)):
                        acc.add_(g)
            for acc, g in zip(grads, parts):
                acc.add_(g)
            values.append(obj.detach())
    return torch.cat(values), grads


def _plan(b: int, s: int, max_batch: int | None) -> tuple[int, int]:
    """(inputs per group, samples per chunk): whole inputs while they fit in ``max_batch``, else sample chunks."""
    limit = b * s if max_batch is None else max(1, int(max_batch))
    if s <= limit:
        return max(1, min(b, limit // s)), s
    return 1, limit


def mean_probs(model: Callable, x: torch.Tensor, w: torch.Tensor, perturb: Perturb,
               max_batch: int | None = None) -> torch.Tensor:
    """``mean_s softmax(f(x + perturb(w_s)))`` (B, K) without a graph, at most ``max_batch`` noisy inputs a pass."""
    b, s = w.shape[:2]
    group, chunk = _plan(b, s, max_batch)
    out = []
    with torch.no_grad():
        for r in range(0, b, group):
            rows = slice(r, min(b, r + group))
            out.append(sum(_prob_sum(model, x[rows], perturb(w[rows, i : i + chunk], rows))
                           for i in range(0, s, chunk)) / s)
    return torch.cat(out)


def class_slots(classes: torch.Tensor | None, b: int, device: torch.device) -> torch.Tensor:
    """The classes ``c_A`` per input as a (B,) long tensor; -1 where still to be chosen (:func:`classes_of`)."""
    if classes is None:
        return torch.full((b,), -1, dtype=torch.long, device=device)
    out = torch.as_tensor(classes, dtype=torch.long, device=device).reshape(-1).clone()
    if out.numel() != b:
        raise ValueError(f"got {out.numel()} classes for {b} inputs")
    return out


def classes_of(slots: torch.Tensor, probs: torch.Tensor, rows: slice) -> torch.Tensor:
    """The classes of ``rows``, fixing unchosen ones to the top class of ``probs`` (the start, seed 000 eq. 3.6)."""
    part = slots[rows]
    if bool((part < 0).any()):
        slots[rows] = torch.where(part < 0, probs.detach().argmax(dim=1), part)
    return slots[rows]


def finish_optimization(params: torch.Tensor, finite: torch.Tensor, history: list[torch.Tensor],
                        slots: torch.Tensor, evaluate: Callable[[], torch.Tensor]) -> OptimizationResult:
    """The end of every optimizer: inputs that took no step get their class from one evaluation at the start
    (``evaluate()``: mean probabilities (B, K) at the initial parameters), and the history becomes (steps, B)."""
    if bool((slots < 0).any()):
        classes_of(slots, evaluate(), slice(None))
    b = params.shape[0]
    objective = torch.stack(history) if history else torch.empty((0, b), device=params.device)
    return OptimizationResult(params.detach(), slots, objective, finite & rows_finite(params))


def rows_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """(B,) bool: every entry of row ``i`` of every tensor is finite."""
    out = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        out &= torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    return out


def expand_rows(values: torch.Tensor | float, b: int, d: int, device: torch.device) -> torch.Tensor:
    """A scalar, (B,) or (B, d) value as a (B, d) float32 tensor."""
    t = torch.as_tensor(values, dtype=torch.float32, device=device)
    if t.ndim == 0:
        t = t.expand(b)
    if t.ndim == 1:
        t = t[:, None].expand(b, d)
    if t.shape != (b, d):
        raise ValueError(f"expected a scalar, ({b},) or ({b}, {d}) values, got shape {tuple(t.shape)}")
    return t.contiguous()


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


def check_stage(steps: int, lr: float, kappa: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    for label, value in (("learning rate", lr), ("kappa", kappa)):
        if not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
            raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")
