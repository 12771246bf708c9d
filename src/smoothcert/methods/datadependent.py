"""Shared machinery of the data-dependent methods (DDS, ANCER, RANCER, RDDRS): optimize, certify, remember.

Every data-dependent method runs the same three steps for a batch of inputs (seed 000 sections 3.2-3.3, ch. 4;
seed 003):

1. **Optimize** a smoothing distribution per input by stochastic gradient ascent on a reparameterized
   objective: the softmax probabilities of the base classifier, averaged over noise ``eps(params, w)`` with
   ``w`` drawn from a fixed standard distribution, so the gradient flows to the noise parameters (seed 000
   eq. 3.7). Probabilities (never raw logits) are clamped to [0.001, 0.999] before ``Phi^-1``. All inputs of a
   batch are optimized by one tensor program over ``(B, samples, d)``; each input draws from its own
   ``"optimize-<stage>"`` stream (:meth:`RunContext.generators`), never from the certification streams.
2. **Certify** the chosen noise exactly as Cohen et al. do, on fresh ``select`` / ``estimate`` samples
   (:func:`smoothcert.smooth.certify`). The optimization only decides *which* distribution is certified, so
   the certificate's guarantee holds as for a fixed noise - for that input alone.
3. **Memory-based certification** (seed 000 Algorithm 1): a region chosen after looking at ``x`` may overlap
   the region of an earlier input with another prediction; :class:`~smoothcert.memory.CertificationMemory`
   keeps, shrinks or abstains, in the fixed order of the run. On by default; ``--no-memory`` turns it off
   (the config records it).

The chosen noise parameters of every input are saved beside the results log in
``<results>.noise/<dataset index>.safetensors`` (:meth:`~smoothcert.noise.Noise.parameters`, with the noise
kind in the metadata), so every certificate can be checked later; a resumed run checks they are there.

**Resume.** ``<results>.memory`` (:class:`~smoothcert.memory.CertificationMemory`) is saved as the run goes. The
memory records an input just before the runner writes its row; after a crash in between, the input is
processed again and its recomputed certificate must agree with the recorded decision (same prediction, same
region), else a ValueError - a resumed run needs a reproducible computation (same device and settings).

**Fall-back.** When the base classifier gives no gradient (it is not differentiable), or an input's optimization
produces a non-finite value, that input is certified with the isotropic noise at ``--sigma`` (Cohen's
certificate, sound for any input) and its row says so in the ``fallback`` column; never a silently wrong noise.
"""

from __future__ import annotations

import argparse
import math
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smoothcert.methods.memory import CertificationMemory
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.noise.base import Noise, noise_from_parameters
from smoothcert.engine.smooth import certify
from smoothcert.noise.uniform import UniformDiagonal
from smoothcert.methods.base import CertifyMethod, RunContext, argument_group_once, certificate_row

__all__ = [
    "FAMILIES", "GAPS", "NotDifferentiable", "check_optimizer_arguments", "OptimizationResult", "standard_draws",
    "objective_gap", "objective_and_gradient", "mean_probs", "class_slots", "classes_of", "DataDependentMethod",
    "Choice", "finish_optimization", "rows_finite", "cpu_pass_size", "CPU_PASS_VALUES",
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


# ----------------------------------------------------------------------------------------------------------------
# The method plug-in
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Choice:
    """The noise chosen for one input, with the row's extra values and the fall-back reason (``"none"``)."""

    noise: Noise
    extra: dict[str, Any] = field(default_factory=dict)
    fallback: str = "none"


class DataDependentMethod(CertifyMethod):
    """Base class: subclasses implement :meth:`choose` (noise per input); certification, memory, saving here.

    Row columns after the common ones: ``sigma`` (the run's sigma_0), ``scale_iso`` (the input's isotropic DDS
    scale: sigma_x, or the uniform half-width), ``min_scale`` / ``max_scale`` (of the certified noise),
    ``norm`` (l2 or l1), ``radius_norm`` (radius of the largest ball *of that norm* inside the region: equal
    to ``radius`` for l2; for l1 the smallest semi-axis ``gap * min lambda``, while ``radius`` stays the l2
    inscribed radius), ``memory`` (kept / shrunk / abstained; ``off`` without memory; ``n/a`` when
    certification abstained) and ``fallback`` (``none`` or why the isotropic noise at sigma_0 was used).
    """

    columns = ("sigma", "scale_iso", "min_scale", "max_scale", "norm", "radius_norm", "memory", "fallback")
    norms: tuple[str, ...] = ("l2",)

    def __init__(self, sigma: float, *, samples: int = 100, dds_steps: int = 900, dds_lr: float = 0.04,
                 gap: str = "pa", norm: str = "l2", memory: bool = True, max_batch: int | None = None):
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0 (the base noise level in input units), got {sigma!r}")
        if norm not in self.norms:
            raise ValueError(f"--method {self.name} certifies the norms {', '.join(self.norms)}, got --norm {norm}")
        if gap not in GAPS:
            raise ValueError(f"--opt-gap must be one of {', '.join(GAPS)}, got {gap!r}")
        for label, value, low in (("--opt-samples", samples, 1), ("--dds-steps", dds_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        if not (isinstance(dds_lr, (int, float)) and math.isfinite(dds_lr) and dds_lr >= 0):
            raise ValueError(f"--dds-lr must be a finite number >= 0, got {dds_lr!r}")
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"--opt-batch-size must be an integer >= 1, got {max_batch!r}")
        self.sigma = float(sigma)
        self.samples, self.dds_steps, self.dds_lr = samples, dds_steps, float(dds_lr)
        self.gap, self.norm, self.use_memory, self.max_batch = gap, norm, bool(memory), max_batch
        self.memory = None
        self._replay: dict = {}
        self.noise_dir: Path | None = None
        #: The :class:`~smoothcert.smooth.Certificate` records of the last batch (before memory), for inspection.
        self.last_certificates: list = []

    # -- options -------------------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = argument_group_once(parser, "data-dependent smoothing (dds, ancer, rancer, rancer-best, rddrs)")
        if g is None:
            return
        g.add_argument("--opt-samples", type=int, default=100,
                       help="noise samples per input and optimization step (default 100)")
        g.add_argument("--opt-batch-size", type=int, default=None,
                       help="noisy inputs per forward and backward pass while optimizing (default: --batch-size on "
                            f"an accelerator; on a CPU about {CPU_PASS_VALUES:,} input values, or one input's samples)")
        g.add_argument("--opt-gap", choices=GAPS, default="pa",
                       help="objective gap: pa = Phi^-1(p_A) as certified (default); top2 = the published "
                            "(Phi^-1(p_A) - Phi^-1(p_B)) / 2")
        g.add_argument("--dds-steps", type=int, default=900,
                       help="gradient-ascent steps of the isotropic (DDS) stage (default 900; 0 keeps --sigma)")
        g.add_argument("--dds-lr", type=float, default=0.04, help="learning rate of the DDS stage (default 0.04)")
        g.add_argument("--ancer-steps", type=int, default=100, help="Adam steps of ANCER / RANCER (default 100)")
        g.add_argument("--ancer-lr", type=float, default=0.04, help="Adam learning rate of ANCER / RANCER (0.04)")
        g.add_argument("--kappa", type=float, default=2.0,
                       help="weight of the min-scale term in ANCER / RANCER's objective (default 2)")
        g.add_argument("--norm", choices=("l2", "l1"), default="l2",
                       help="certified norm: l2 (Gaussian noise) or l1 (uniform noise, dds and ancer; "
                            "half-width sqrt(3) * sigma per coordinate)")
        g.add_argument("--no-memory", action="store_true",
                       help="skip memory-based certification (unsound across inputs; for ablations only)")

    @classmethod
    def common_kwargs(cls, args: argparse.Namespace) -> dict[str, Any]:
        return dict(samples=args.opt_samples, dds_steps=args.dds_steps, dds_lr=args.dds_lr, gap=args.opt_gap,
                    norm=args.norm, memory=not args.no_memory, max_batch=args.opt_batch_size)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "sigma": self.sigma, "opt_samples": self.samples, "dds_steps": self.dds_steps,
                "dds_lr": self.dds_lr, "opt_gap": self.gap, "norm": self.norm, "memory": self.use_memory,
                "opt_batch_size": self.max_batch, **self.stage_config()}

    def stage_config(self) -> dict[str, Any]:
        """Settings of the method's own stages (added to :meth:`config`)."""
        return {}

    # -- the method's own step -----------------------------------------------------------------------------
    @abstractmethod
    def choose(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]) -> list[Choice]:
        """One :class:`Choice` per input, from the optimization streams only."""

    @property
    def family(self) -> str:
        return "uniform" if self.norm == "l1" else "gaussian"

    @property
    def base_scale(self) -> float:
        """``sigma`` in the family's parameter: the Gaussian's sigma, or the uniform half-width sqrt(3) sigma."""
        return self.sigma * math.sqrt(3.0) if self.family == "uniform" else self.sigma

    def base_noise(self) -> Noise:
        """The isotropic noise at ``--sigma``: the fall-back of every data-dependent method."""
        if self.family == "uniform":
            return UniformDiagonal.isotropic(self.base_scale)
        return IsotropicGaussian(self.sigma)

    def dds_stage(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]) -> OptimizationResult:
        """The isotropic scale per input (seed 000 eq. 3.7), from the ``optimize-dds`` streams."""
        from smoothcert.methods.dds import optimize_dds

        return optimize_dds(ctx.model, x, self.base_scale, generators=ctx.generators(indices, "optimize-dds"),
                            steps=self.dds_steps, lr=self.dds_lr, samples=self.samples, family=self.family,
                            gap=self.gap, max_batch=self.opt_batch(ctx, x))

    def opt_batch(self, ctx: RunContext, x: torch.Tensor, samples: int | None = None) -> int:
        """Noisy inputs per forward and backward pass of an optimizer for the inputs ``x``: ``--opt-batch-size``
        when given, else ``--batch-size`` on an accelerator, and on a CPU at most :func:`cpu_pass_size` (but one
        input's ``samples`` always share a pass)."""
        if self.max_batch:
            return self.max_batch
        if ctx.device.type != "cpu":
            return ctx.batch_size
        return min(ctx.batch_size, max(cpu_pass_size(x[0].numel()), samples or self.samples))

    def fallback_choices(self, b: int, reason: str) -> list[Choice]:
        return [Choice(self.base_noise(), {}, reason) for _ in range(b)]

    # -- certify -------------------------------------------------------------------------------------------
    def certify(self, ctx: RunContext, x: torch.Tensor, labels: torch.Tensor, indices: Sequence[int]
                ) -> list[dict[str, Any]]:
        try:
            choices = self.choose(ctx, x, indices)
        except NotDifferentiable as e:
            choices = self.fallback_choices(x.shape[0], "not-differentiable: " + " ".join(str(e).split()))
        noises = [c.noise for c in choices]
        certs = certify(ctx.model, x, noises, ctx.num_classes, ctx.n0, ctx.n, ctx.alpha,
                        batch_size=ctx.batch_size, block=ctx.block, generators=ctx.certify_generators(indices),
                        dtype=ctx.dtype, seed=ctx.seed)
        self.last_certificates = certs
        rows = []
        for i, (idx, choice, cert) in enumerate(zip(indices, choices, certs)):
            self._save_noise(int(idx), choice.noise)
            row = certificate_row(cert, self.name)
            scales = torch.as_tensor(choice.noise.scales(), dtype=torch.float64).reshape(-1)
            row.update(sigma=self.sigma, scale_iso=float(choice.extra.pop("scale_iso", float("nan"))),
                       min_scale=float(scales.min()), max_scale=float(scales.max()), norm=self.norm,
                       radius_norm=0.0 if cert.abstained else float(cert.region.axes.min()),
                       fallback=choice.fallback, memory="off" if not self.use_memory else "n/a")
            if self.use_memory:
                action, region, radius = self._remember(int(idx), x[i], cert)
                if not cert.abstained:
                    row["memory"] = action
                if action == "abstained":
                    row.update(predict=-1, radius=0.0, radius_proxy=0.0, radius_norm=0.0)
                elif action == "shrunk":  # an l2 ball of radius r holds the l1 ball of radius r too
                    row.update(radius=float(radius), radius_proxy=float(region.proxy_radius),
                               radius_norm=float(radius))
            row.update({k: v for k, v in choice.extra.items() if k in self.columns})
            for column in self.columns:
                row.setdefault(column, "none")
            rows.append(row)
        return rows

    # -- side files ----------------------------------------------------------------------------------------
    def _save_noise(self, index: int, noise: Noise) -> None:
        if self.noise_dir is None:
            return
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in noise.parameters().items()}
        path = self.noise_dir / f"{index}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"kind": noise.kind, "index": str(index), "method": self.name})
        tmp.replace(path)

    @staticmethod
    def noise_path(results: Path) -> Path:
        """The folder of the per-input noise parameters of a results log."""
        results = Path(results)
        return results.with_name(results.name + ".noise")

    @staticmethod
    def load_noise(results: Path, index: int) -> Noise:
        """The noise certified for dataset index ``index`` of a results log."""
        from safetensors import safe_open

        path = DataDependentMethod.noise_path(results) / f"{int(index)}.safetensors"
        if not path.exists():
            raise ValueError(f"no saved noise for index {index}: {path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            kind = f.metadata().get("kind")
            params = {k: f.get_tensor(k) for k in f.keys()}
        return noise_from_parameters(kind, params)

    def open(self, ctx: RunContext, results: Path, done: Sequence[int]) -> None:
        self.noise_dir = self.noise_path(results)
        self.noise_dir.mkdir(parents=True, exist_ok=True)
        missing = [int(i) for i in done if not self._saved_by_this_method(int(i))]
        if missing:
            raise ValueError(f"{results} has {len(done)} rows but {self.noise_dir} lacks the noise parameters of "
                             f"{len(missing)} of them (e.g. index {missing[0]}), or holds another method's: the log "
                             "and its noise folder do not belong together; use another output path")
        if self.use_memory:
            self.memory = self.open_memory(ctx, Path(results), done)

    def memory_fingerprint(self, ctx: RunContext) -> dict[str, Any]:
        """What a saved memory must have been built with: the method's settings and the run's sampling."""
        return {**self.config(), "seed": ctx.seed, "n0": ctx.n0, "n": ctx.n, "alpha": ctx.alpha,
                "dtype": str(ctx.dtype), "num_classes": ctx.num_classes}

    @staticmethod
    def _same_decision(record, region, cert) -> bool:
        """Does a recomputed certificate agree with the memory's record of the same input (resume after a crash)?

        Same prediction; for a kept region the same ellipsoid (axes and basis to 1e-9, relative); for a shrunk
        one, the recorded ball inside the new region. Anything else is refused: the memory must hold exactly
        the regions that the log reports.
        """
        if record.prediction != cert.prediction:
            return False
        if record.action == "abstained" or cert.region is None:
            return record.action == "abstained" or cert.prediction < 0
        if record.action == "shrunk":
            return record.radius <= cert.region.inscribed_radius
        if region is None or region.axes.shape != cert.region.axes.shape:
            return False
        new_axes = cert.region.axes.to(region.axes.device)
        if not torch.allclose(region.axes, new_axes, rtol=1e-9, atol=0.0):
            return False
        old_basis, new_basis = getattr(region, "basis", None), getattr(cert.region, "basis", None)
        if (old_basis is None) != (new_basis is None):
            return False
        return old_basis is None or torch.allclose(old_basis, new_basis.to(old_basis.device), rtol=0.0, atol=1e-12)

    def _saved_by_this_method(self, index: int) -> bool:
        from safetensors import safe_open

        path = self.noise_dir / f"{index}.safetensors"
        if not path.exists():
            return False
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return (meta.get("method") == self.name and meta.get("index") == str(index)
                and meta.get("kind") in Noise.registry)

    def open_memory(self, ctx: RunContext, results: Path, done: Sequence[int]):
        """Create or resume ``<results>.memory`` (:meth:`CertificationMemory.open`) and reconcile it with the log.

        The memory records an input before the runner writes its row, so after a crash it may hold records of
        inputs whose rows are missing; those inputs are processed again, and their recomputed certificate must
        match the recorded decision (else a ValueError: never two different decisions for one input).
        """
        memory = CertificationMemory.open(results.with_name(results.name + ".memory"), self.memory_fingerprint(ctx))
        records = memory.records
        done = [int(i) for i in done]
        if len(records) < len(done) or [r.index for r in records[: len(done)]] != done:
            raise ValueError(f"{results}.memory does not match {results}: it holds {len(records)} records for "
                             f"{len(done)} rows (or another order); the memory must record every certified input, "
                             "so use another output path (or remove both)")
        regions = {index: region for index, _, region in memory.stored}
        self._replay = {r.index: (r, regions.get(r.index)) for r in records[len(done):]}
        return memory

    def _remember(self, index: int, center: torch.Tensor, cert) -> tuple[str, Any, float]:
        """Algorithm 1 for one certified input (an abstained certificate is recorded as abstained)."""
        if self.memory is None:  # used without open(): an in-process memory, still sound across this process
            self.memory, self._replay = CertificationMemory(), {}
        if self._replay:
            if index not in self._replay:
                raise ValueError(f"the saved memory holds records of inputs after the log's last row, but not of "
                                 f"index {index}: the run's order changed; use another output path")
            record, region = self._replay.pop(index)
            if not self._same_decision(record, region, cert):
                raise ValueError(f"index {index} was recorded in the memory with prediction {record.prediction} "
                                 f"({record.action}, radius {record.radius}) but now certifies {cert.prediction} "
                                 f"with radius {cert.radius}: the computation is not reproducible here (another "
                                 "device or thread count?); resume where the run started, or use another output path")
            return record.action, region, record.radius
        return self.memory.check(index, center, cert.prediction, cert.region)

    def close(self) -> None:
        if self.memory is not None and hasattr(self.memory, "close"):
            self.memory.close()
        self.memory = None
