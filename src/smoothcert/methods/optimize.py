"""The optimizers' shared mathematics: reparameterized objectives, batched gradients, and the DDS stage.

Every data-dependent method optimizes a smoothing distribution per input by stochastic gradient ascent on a
reparameterized objective: the softmax probabilities of the base classifier, averaged over noise
``eps(params, w)`` with ``w`` drawn from a fixed standard distribution, so the gradient flows to the noise
parameters (seed 000 eq. 3.7). Probabilities (never raw logits) are clamped to [0.001, 0.999] before
``Phi^-1``. All inputs of a batch are optimized by one tensor program over ``(B, samples, d)``; each input draws
from its own ``"optimize-<stage>"`` stream, never from the certification streams.

The noise family (its standard draws ``w`` and its differentiable gap) is a class of :mod:`smoothcert.noise`
(:class:`~smoothcert.noise.IsotropicGaussian` or :class:`~smoothcert.noise.UniformDiagonal`); the public
``family=`` keyword also takes the names of :data:`FAMILIES`, mapped to the class once by :func:`noise_family`.

An input whose averaged-softmax gap is <= 0 at the start keeps its start (:func:`started_gap`). An input whose
optimization produces a non-finite value keeps its last finite parameters, and its
:attr:`OptimizationResult.reasons` entry says which quantity at which step (:class:`FailureLog`).

:func:`optimize_dds` is the isotropic stage every method starts from (DDS itself, and the ``theta_iso`` of
ANCER, RANCER and RDDRS).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.noise.uniform import UniformDiagonal
from smoothcert.validation import check_count, check_number, check_positive

__all__ = [
    "FAMILIES", "GAPS", "CLAMP", "MAX_LOG_STEP", "RDDRS_MAX_LOG_STEP", "NotDifferentiable", "check_optimizer_arguments",
    "OptimizationResult", "FailureLog", "noise_family", "standard_draws", "objective_gap", "started_gap",
    "objective_and_gradient", "mean_probs", "class_slots", "classes_of", "finish_optimization", "rows_finite",
    "expand_rows", "cpu_pass_size", "CPU_PASS_VALUES", "optimize_dds", "fallback_reason",
]

#: Noise families the optimizers reparameterize, by the name the ``family=`` keyword takes: ``eps = scale * w``
#: with ``w`` from the class's ``standard_draws`` (``N(0, 1)`` or ``U[-1, 1]``) and its ``differentiable_gap``.
FAMILIES = {"gaussian": IsotropicGaussian, "uniform": UniformDiagonal}
#: Objective gaps: ``"pa"`` = the certificate's own gap (``Phi^-1(p_A)``, or ``2 p_A - 1`` for uniform noise);
#: ``"top2"`` = the published two-class form (``(Phi^-1(p_A) - Phi^-1(p_B)) / 2``, or ``p_A - p_B``).
GAPS = ("pa", "top2")
#: Probabilities are clamped to this interval before the gap (seed 000 / ANCER public code).
CLAMP = (0.001, 0.999)
#: Trust region of DDS's log-scale steps: one step changes sigma by at most ``exp(MAX_LOG_STEP)``. Published-size
#: steps stay below it (the first step from sigma_0 = 0.25 at the clamp is lr * Phi^-1(0.999) / 0.25 = 0.49).
MAX_LOG_STEP = 0.5
#: One RDDRS ascent step (full or low-rank) stretches ``C`` by at most ``exp(RDDRS_MAX_LOG_STEP)`` in any direction.
RDDRS_MAX_LOG_STEP = 0.1

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
    ``finite``: False where the optimization produced a non-finite value (that input must fall back);
    ``reasons``: per input ``""``, or what became non-finite at which step (:class:`FailureLog`).
    """

    params: torch.Tensor
    classes: torch.Tensor
    objective: torch.Tensor
    finite: torch.Tensor
    reasons: list[str] = field(default_factory=list)

    def reason(self, i: int) -> str:
        """Why input ``i`` must fall back (``""`` when it need not)."""
        return "" if bool(self.finite[i]) else (self.reasons[i:i + 1] or [""])[0] or "non-finite parameters"


class FailureLog:
    """Which inputs of a batch are still finite, and for the others the first quantity and step that was not.

    ``check(step, label, *tensors)`` marks every still-finite row with a non-finite entry in one of the
    tensors (rows = inputs) as failed with the reason ``"<stage> step <step>: <label> not finite"``.
    """

    def __init__(self, b: int, stage: str, device: torch.device | str = "cpu"):
        self.stage = stage
        self.finite = torch.ones(b, dtype=torch.bool, device=device)
        self.reasons = [""] * b

    def check(self, step: int, label: str, *tensors: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Record the rows ``rows`` of the batch that turn non-finite here; returns the updated mask of ``rows``."""
        part = self.finite[rows]
        bad = part & ~rows_finite(*tensors)
        if bool(bad.any()):
            start = rows.start or 0
            for i in bad.nonzero().flatten().tolist():
                self.reasons[start + i] = f"{self.stage} step {step}: {label} not finite"
            self.finite[rows] = part & ~bad
        return self.finite[rows]


def fallback_reason(i: int, *results: OptimizationResult) -> str:
    """The ``fallback`` entry of input ``i`` after the stages ``results``: ``""`` when every stage is finite, else
    ``"non-finite optimization: <the first failing stage's reason>"``."""
    return next(("non-finite optimization: " + r.reason(i) for r in results if r.reason(i)), "")


def noise_family(family):
    """The noise family for ``family``: a name of :data:`FAMILIES`, or any class with the classmethods
    ``standard_draws(generators, samples, shape, device)`` and ``differentiable_gap(p_a, p_b=None)``."""
    if isinstance(family, str):
        family = FAMILIES.get(family, family)
    if isinstance(family, type) and callable(getattr(family, "standard_draws", None)) \
            and callable(getattr(family, "differentiable_gap", None)):
        return family
    raise ValueError(f"noise family must be one of {', '.join(FAMILIES)} or a class with standard_draws and "
                     f"differentiable_gap, got {family!r}")


def check_optimizer_arguments(x: torch.Tensor, generators: Sequence, steps: int, lr: float, samples: int,
                              family="gaussian", gap: str = "pa", max_log_step: float = 1.0) -> None:
    """One clear error for a bad argument of an optimizer (shared by DDS, ANCER / RANCER and RDDRS)."""
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.ndim < 2 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty floating-point batch (B, *input_shape), pixels in [0, 1]")
    if len(generators) != x.shape[0]:
        raise ValueError(f"got {len(generators)} generators for {x.shape[0]} inputs (one per input)")
    check_count("steps", steps, minimum=0)
    check_count("samples", samples)
    check_number("the learning rate", lr, low=0.0)
    check_positive("max_log_step", max_log_step)
    noise_family(family)
    if gap not in GAPS:
        raise ValueError(f"objective gap must be one of {', '.join(GAPS)}, got {gap!r}")


def standard_draws(generators: Sequence[torch.Generator | None], samples: int, shape: Sequence[int],
                   family="gaussian", device: torch.device | str = "cpu") -> torch.Tensor:
    """``(B, samples, *shape)`` float32 standard draws of the family (``N(0, 1)`` or ``U[-1, 1]``), input ``i``
    from ``generators[i]`` (one call per input, so an input's draws do not depend on its batch)."""
    return noise_family(family).standard_draws(generators, samples, tuple(shape), device)


def objective_gap(probs: torch.Tensor, classes: torch.Tensor, family="gaussian", form: str = "pa"
                  ) -> torch.Tensor:
    """Differentiable gap of averaged softmax probabilities ``probs`` (B, K) for the classes ``c_A`` (B,).

    Probabilities are clamped to [0.001, 0.999], then the family's ``differentiable_gap``: Gaussian
    ``Phi^-1(p_A)`` (``form="pa"``, the gap the certificate uses, seed 000 eq. 3.3 with ``p_B = 1 - p_A``) or
    ``(Phi^-1(p_A) - Phi^-1(p_B)) / 2`` (``"top2"``, seed 000 eq. 3.6-3.7, ``p_B`` the runner-up); uniform (l1)
    ``2 p_A - 1`` or ``p_A - p_B``.
    """
    if form not in GAPS:
        raise ValueError(f"objective gap must be one of {', '.join(GAPS)}, got {form!r}")
    p_a = probs.gather(1, classes[:, None])[:, 0].clamp(*CLAMP)
    p_b = probs.scatter(1, classes[:, None], -math.inf).max(dim=1).values.clamp(*CLAMP) if form == "top2" else None
    return noise_family(family).differentiable_gap(p_a, p_b)


def started_gap(gate: torch.Tensor, gap: torch.Tensor, rows: slice) -> torch.Tensor:
    """``gap`` of the inputs ``rows`` whose gap at their first evaluation (the start) was > 0, else 0 (no ascent);
    ``gate``: (B,) slots, -1 until an input's first evaluation (``class_slots(None, B, device)``).

    An averaged-softmax gap <= 0 at the start (e.g. three classes with ``p_A < 1/2`` under an under-confident
    softmax, while the hard votes certify) certifies nothing there (seed 000 eq. 3.3 needs ``p_A > 1/2``), and
    ascent on ``scale * gap < 0`` shrinks the scale to its floor, where the hard-vote radius is ~100x smaller:
    those inputs keep their start (zero gradient). The others ascend the published objective, negative
    estimates included (a positive part ``max(gap, 0)`` at every step would bias noisy ascents upward)."""
    part = gate[rows]
    if bool((part < 0).any()):
        gate[rows] = torch.where(part < 0, (gap.detach() > 0).to(gate.dtype), part)
    return gap * gate[rows].to(gap.dtype)


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


def finish_optimization(params: torch.Tensor, failures: FailureLog, history: list[torch.Tensor],
                        slots: torch.Tensor, evaluate: Callable[[], torch.Tensor]) -> OptimizationResult:
    """The end of every optimizer: inputs that took no step get their class from one evaluation at the start
    (``evaluate()``: mean probabilities (B, K) at the initial parameters), the history becomes (steps, B), and
    the failures (with non-finite final parameters) become ``finite`` and ``reasons``."""
    if bool((slots < 0).any()):
        classes_of(slots, evaluate(), slice(None))
    b = params.shape[0]
    failures.check(len(history), "final parameters", params.detach())
    objective = torch.stack(history) if history else torch.empty((0, b), device=params.device)
    return OptimizationResult(params.detach(), slots, objective, failures.finite.clone(), list(failures.reasons))


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
    family="gaussian",
    gap: str = "pa",
    min_scale: float | None = None,
    classes: torch.Tensor | None = None,
    max_batch: int | None = None,
    max_log_step: float = MAX_LOG_STEP,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> OptimizationResult:
    """Gradient ascent on the radius ``R(s) = s * gap(s)`` (seed 000 eq. 3.7, :func:`started_gap`) for all inputs.

    The published step ``s <- s + lr dR/ds`` is taken in log scale, ``log s <- log s + clip(lr (dR/ds) / s,
    +-max_log_step)``: the same ascent to first order (``s exp(lr g / s) = s + lr g + O((lr g)^2 / s)``), but a
    step never makes ``s`` negative and changes it by at most the factor ``exp(max_log_step)``. (Near the clamp
    ``p_A = 0.999``, ``dPhi^-1/dp = 1 / phi(3.09) ~ 300`` times a sharp softmax's derivative at one noise sample
    gives gradients of -100 and more, and the plain step took ``s`` from 0.3 to the floor in one step.)

    ``scale0``: the start (sigma of Gaussian noise, half-width of uniform noise), scalar or (B,). The scale
    stays >= ``min_scale`` (default ``scale0 / 100``). ``generators``: one per input (the optimization stream).
    ``classes``: the class ``c_A`` per input (default: the top class of the averaged softmax at the start).
    ``callback(step, scale)`` sees the scales after every update. Returns the (B,) scales.
    """
    check_optimizer_arguments(x, generators, steps, lr, samples, family, gap, max_log_step)
    family = noise_family(family)
    b, shape = x.shape[0], tuple(x.shape[1:])
    x = x.detach().float()
    scale = torch.as_tensor(scale0, dtype=torch.float32, device=x.device).expand(b).clone()
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise ValueError("the starting scale (sigma_0, or the uniform half-width) must be finite and > 0")
    floor = (scale / 100.0) if min_scale is None else torch.full_like(scale, float(min_scale))
    scale.requires_grad_(True)
    failures, history = FailureLog(b, "dds", x.device), []
    slots, gate = class_slots(classes, b, x.device), class_slots(None, b, x.device)

    def perturb(w: torch.Tensor, rows: slice) -> torch.Tensor:
        return w * scale[rows].view(-1, *([1] * (w.ndim - 1)))

    def objective(probs: torch.Tensor, rows: slice) -> torch.Tensor:
        return scale[rows] * started_gap(gate, objective_gap(probs, classes_of(slots, probs, rows), family, gap), rows)

    for step in range(steps):
        w = family.standard_draws(generators, samples, shape, x.device)
        obj, (grad,) = objective_and_gradient(model, x, w, perturb, objective, [scale], max_batch)
        failures.check(step, "objective scale * gap", obj)
        ok = failures.check(step, "gradient d(scale * gap)/d scale", grad)
        history.append(obj)
        with torch.no_grad():
            log_step = torch.where(ok, lr * grad / scale, torch.zeros_like(grad)).clamp(-max_log_step, max_log_step)
            scale.mul_(log_step.exp())
            scale.copy_(torch.maximum(scale, floor))
        if callback is not None:
            callback(step, scale.detach())
    return finish_optimization(scale, failures, history, slots, lambda: mean_probs(
        model, x, family.standard_draws(generators, samples, shape, x.device), perturb, max_batch))
