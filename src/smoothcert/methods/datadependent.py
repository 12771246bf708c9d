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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smoothcert.methods.memory_replay import RunMemory
from smoothcert.methods.noise_store import NoiseStore
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.noise.base import Noise
from smoothcert.engine.smooth import certify
from smoothcert.noise.uniform import UniformDiagonal
from smoothcert.methods.base import CertifyMethod, RunContext, argument_group_once, certificate_row

from smoothcert.methods.optimize import (CPU_PASS_VALUES, GAPS, NotDifferentiable, OptimizationResult, cpu_pass_size,
                                        optimize_dds)

__all__ = ["DataDependentMethod", "Choice"]

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
        self.memory: RunMemory | None = None
        self.noise_store: NoiseStore | None = None
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
            if self.noise_store is not None:
                self.noise_store.save(int(idx), choice.noise)
            row = certificate_row(cert, self.name)
            scales = torch.as_tensor(choice.noise.scales(), dtype=torch.float64).reshape(-1)
            row.update(sigma=self.sigma, scale_iso=float(choice.extra.pop("scale_iso", float("nan"))),
                       min_scale=float(scales.min()), max_scale=float(scales.max()), norm=self.norm,
                       radius_norm=0.0 if cert.abstained else float(cert.region.axes.min()),
                       fallback=choice.fallback, memory="off" if not self.use_memory else "n/a")
            if self.use_memory:
                if self.memory is None:  # used without open(): an in-process memory, still sound in this process
                    self.memory = RunMemory()
                action, region, radius = self.memory.remember(int(idx), x[i], cert)
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

    def open(self, ctx: RunContext, results: Path, done: Sequence[int]) -> None:
        self.noise_store = NoiseStore(results, self.name)
        self.noise_store.create()
        missing = [int(i) for i in done if not self.noise_store.holds(int(i))]
        if missing:
            raise ValueError(f"{results} has {len(done)} rows but {self.noise_store.folder} lacks the noise parameters of "
                             f"{len(missing)} of them (e.g. index {missing[0]}), or holds another method's: the log "
                             "and its noise folder do not belong together; use another output path")
        if self.use_memory:
            self.memory = RunMemory.open(Path(results), self.memory_fingerprint(ctx), done)

    def memory_fingerprint(self, ctx: RunContext) -> dict[str, Any]:
        """What a saved memory must have been built with: the method's settings, the run's sampling and what the
        run certifies (``ctx.identity``: the checkpoints' sha256 and the data set split)."""
        return {**self.config(), "seed": ctx.seed, "n0": ctx.n0, "n": ctx.n, "alpha": ctx.alpha,
                "dtype": str(ctx.dtype), "num_classes": ctx.num_classes, **ctx.identity}

    #: The noise certified for a dataset index of a results log (:meth:`NoiseStore.load`).
    load_noise = staticmethod(NoiseStore.load)
    noise_path = staticmethod(NoiseStore.path)

    def close(self) -> None:
        """Flush and release the memory's files; the memory itself stays, so later inputs are still checked
        against every certificate given so far (only :meth:`open` starts another run's memory)."""
        if self.memory is not None:
            self.memory.close()
