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
   (the settings record it).

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

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smoothcert.engine.smooth import Certificate, evaluation_mode
from smoothcert.methods.base import CertifyMethod, RunContext, sigma_setting
from smoothcert.methods.compare_base import compare_with_base
from smoothcert.methods.memory_replay import RunMemory
from smoothcert.methods.noise_store import NoiseStore
from smoothcert.methods.optimize import (CPU_PASS_VALUES, GAPS, NotDifferentiable, OptimizationResult, cpu_pass_size,
                                         optimize_dds)
from smoothcert.methods.records import MemoryDecision, MethodRecord
from smoothcert.noise.base import Noise
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.noise.uniform import UniformDiagonal, uniform_half_width
from smoothcert.settings import Settings, choice, integer, number, switch

__all__ = ["DataDependentMethod", "DataDependentSettings", "Choice", "norm_setting"]


def norm_setting(*norms: str) -> Any:
    """The ``norm`` field of a method that certifies ``norms`` (the first is the default)."""
    return choice(norms[0], norms, help="certified norm: l2 (Gaussian noise) or l1 (uniform noise, dds and ancer; "
                                        "half-width sqrt(3) * sigma per coordinate)")


@dataclass(frozen=True)
class DataDependentSettings(Settings):
    """What every data-dependent method shares: the base noise, the isotropic (DDS) stage, the norm, memory."""

    sigma: float = sigma_setting()
    opt_samples: int = integer(100, low=1, help="noise samples per input and optimization step")
    opt_batch_size: int | None = integer(
        None, low=1, optional=True,
        help="noisy inputs per forward and backward pass while optimizing (default: --batch-size on an "
             f"accelerator; on a CPU about {CPU_PASS_VALUES:,} input values, or one input's samples)")
    opt_gap: str = choice("pa", GAPS, help="objective gap: pa = Phi^-1(p_A) as certified; top2 = the published "
                                           "(Phi^-1(p_A) - Phi^-1(p_B)) / 2")
    dds_steps: int = integer(900, low=0, help="gradient-ascent steps of the isotropic (DDS) stage (0 keeps --sigma)")
    dds_lr: float = number(0.04, low=0.0, help="learning rate of the DDS stage")
    norm: str = norm_setting("l2", "l1")
    memory: bool = switch(True, help="skip memory-based certification (unsound across inputs; for ablations only)")
    compare_base: int = integer(
        0, low=0, help="samples per candidate on separate streams to compare the optimized noise with the base "
                       "noise at --sigma by the proxy radius certifiable at --n; the larger is certified (0: "
                       "always the optimized noise)")


#: A certified scale this many times sigma_0 (or more) is flagged ``extreme``; the DDS floor is sigma_0 / 100.
EXTREME_SCALE = 100.0

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

    Record fields (columns after the common ones): ``sigma`` (the run's sigma_0), ``scale_iso`` (the input's
    isotropic DDS scale: sigma_x, or the uniform half-width), ``min_scale`` / ``max_scale`` (of the certified
    noise), ``norm`` (l2 or l1), ``radius_norm`` (radius of the largest ball *of that norm* inside the final
    region: equal to ``radius`` for l2; for l1 the smallest semi-axis ``gap * min lambda``, while ``radius``
    stays the l2 inscribed radius), ``memory`` (kept / shrunk / abstained; ``off`` without memory; ``n/a`` when
    certification abstained), ``fallback`` (``none`` or why the isotropic noise at sigma_0 was used) and
    ``noise_kept`` (``optimized``, or ``base`` where ``--compare-base`` chose the noise at sigma_0,
    :mod:`.compare_base`);
    ``scale_flag``: ``at-floor`` when the DDS scale ended at the ascent's floor (sigma_0 / 100, :func:`optimize_dds`),
    ``extreme`` when a certified scale is at least :data:`EXTREME_SCALE` times sigma_0, else ``none`` (the
    certificate stays sound either way; such a row says the optimization ran to an edge and is worth a look).
    """

    columns = ("sigma", "scale_iso", "min_scale", "max_scale", "norm", "radius_norm", "memory", "fallback",
               "noise_kept", "scale_flag")
    settings_type = DataDependentSettings
    modes = True  # in target mode the region certified (and remembered) is the one at radius r, never larger
    keywords = {"samples": "opt_samples", "gap": "opt_gap", "max_batch": "opt_batch_size"}

    def __init__(self, settings: Any = None, /, **keywords: Any):
        super().__init__(settings, **keywords)
        self.memory: RunMemory | None = None
        self.noise_store: NoiseStore | None = None

    @property
    def sigma(self) -> float:
        return self.settings.sigma

    @property
    def norm(self) -> str:
        return self.settings.norm

    @property
    def uses_memory(self) -> bool:
        return self.settings.memory

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
        return uniform_half_width(self.sigma) if self.family == "uniform" else self.sigma

    def base_noise(self) -> Noise:
        """The isotropic noise at ``--sigma``: the fall-back of every data-dependent method."""
        if self.family == "uniform":
            return UniformDiagonal.isotropic(self.base_scale)
        return IsotropicGaussian(self.sigma)

    def dds_stage(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]) -> OptimizationResult:
        """The isotropic scale per input (seed 000 eq. 3.7), from the ``optimize-dds`` streams."""
        s = self.settings
        return optimize_dds(ctx.model, x, self.base_scale, generators=ctx.generators(indices, "optimize-dds"),
                            steps=s.dds_steps, lr=s.dds_lr, samples=s.opt_samples, family=self.family,
                            gap=s.opt_gap, max_batch=self.opt_batch(ctx, x))

    def opt_batch(self, ctx: RunContext, x: torch.Tensor, samples: int | None = None) -> int:
        """Noisy inputs per forward and backward pass of an optimizer for the inputs ``x``: ``--opt-batch-size``
        when given, else ``--batch-size`` on an accelerator, and on a CPU at most :func:`cpu_pass_size` (but one
        input's ``samples`` always share a pass)."""
        if self.settings.opt_batch_size:
            return self.settings.opt_batch_size
        if ctx.device.type != "cpu":
            return ctx.batch_size
        return min(ctx.batch_size, max(cpu_pass_size(x[0].numel()), samples or self.settings.opt_samples))

    def fallback_choices(self, b: int, reason: str) -> list[Choice]:
        return [Choice(self.base_noise(), {}, reason) for _ in range(b)]

    def keep_better(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int], choices: list[Choice]
                    ) -> list[Choice]:
        """``--compare-base``: replace an optimized noise by the base noise where the base is expected to certify
        a larger proxy radius at the run's ``n`` (:func:`~.compare_base.compare_with_base`, separate streams)."""
        base = compare_with_base(ctx, x, indices, [c.noise for c in choices], self.base_noise(),
                                 self.settings.compare_base)
        return [Choice(self.base_noise(), {**c.extra, "noise_kept": "base"}, c.fallback) if use_base and
                c.fallback == "none" else c for c, use_base in zip(choices, base)]

    # -- certify -------------------------------------------------------------------------------------------
    def certify(self, ctx: RunContext, x: torch.Tensor, labels: torch.Tensor, indices: Sequence[int]
                ) -> list[MethodRecord]:
        return self.finish(ctx, x, labels, indices, self.propose(ctx, x, labels, indices))

    def propose(self, ctx: RunContext, x: torch.Tensor, labels: torch.Tensor, indices: Sequence[int]
                ) -> list[tuple[Choice, Certificate]]:
        """Choose each input's noise and certify it (no memory): ``(choice, certificate)`` per input."""
        try:
            with evaluation_mode(ctx.model):  # the optimizers sample the model as certified: in eval mode
                choices = self.choose(ctx, x, indices)
        except NotDifferentiable as e:
            choices = self.fallback_choices(x.shape[0], "not-differentiable: " + " ".join(str(e).split()))
        if self.settings.compare_base:
            choices = self.keep_better(ctx, x, indices, choices)
        certs = ctx.certify(x, [c.noise for c in choices], indices)
        return list(zip(choices, certs))

    def finish(self, ctx: RunContext, x: torch.Tensor, labels: torch.Tensor, indices: Sequence[int],
               proposals: Sequence[tuple[Choice, Certificate]]) -> list[MethodRecord]:
        """Save each chosen noise and pass each certificate through the memory, in the order given."""
        records = []
        for i, (idx, (chosen, cert)) in enumerate(zip(indices, proposals)):
            if self.noise_store is not None:
                self.noise_store.save(int(idx), chosen.noise)
            decision = self.remember(int(idx), x[i], cert)
            records.append(MethodRecord(self.name, cert, cert.region, self.record_fields(chosen, cert, decision),
                                        decision))
        return records

    def remember(self, index: int, center: torch.Tensor, cert: Certificate) -> MemoryDecision | None:
        """Memory-based certification of one certificate (seed 000 Algorithm 1); None with memory off."""
        if not self.uses_memory:
            return None
        if self.memory is None:  # used without open(): an in-process memory, still sound in this process
            self.memory = RunMemory()
        return MemoryDecision(*self.memory.remember(index, center, cert))

    def record_fields(self, chosen: Choice, cert: Certificate, decision: MemoryDecision | None) -> dict[str, Any]:
        """The method's columns for one input, given the memory's decision."""
        extra = dict(chosen.extra)
        scales = torch.as_tensor(chosen.noise.scales(), dtype=torch.float64).reshape(-1)
        if cert.abstained or (decision is not None and decision.action == "abstained"):
            radius_norm = 0.0
        elif decision is not None and decision.action == "shrunk":  # an l2 ball of radius r holds the l1 ball too
            radius_norm = float(decision.radius)
        else:
            radius_norm = cert.region.norm_radius
        if decision is None:
            memory = "off"
        else:
            memory = "n/a" if cert.abstained else decision.action
        scale_iso = float(extra.pop("scale_iso", float("nan")))
        fields = {"sigma": self.sigma, "scale_iso": scale_iso,
                  "min_scale": float(scales.min()), "max_scale": float(scales.max()), "norm": self.norm,
                  "radius_norm": radius_norm, "memory": memory, "fallback": chosen.fallback,
                  "noise_kept": "optimized" if chosen.fallback == "none" else "base",
                  "scale_flag": self.scale_flag(scale_iso, scales)}
        fields.update({k: v for k, v in extra.items() if k in self.columns})
        return {column: fields.get(column, "none") for column in self.columns}

    def scale_flag(self, scale_iso: float, scales: torch.Tensor) -> str:
        """``at-floor``, ``extreme`` or ``none`` for the chosen scales (see the class docstring)."""
        if scale_iso <= self.base_scale / 100.0 * (1 + 1e-5):  # optimize_dds's floor, scale0 / 100 (float32)
            return "at-floor"
        if float(scales.max()) >= EXTREME_SCALE * self.base_scale:
            return "extreme"
        return "none"

    def open(self, ctx: RunContext, results: Path, done: Sequence[int]) -> None:
        self.noise_store = NoiseStore(results, self.name)
        self.noise_store.create()
        missing = [int(i) for i in done if not self.noise_store.holds(int(i))]
        if missing:
            raise ValueError(f"{results} has {len(done)} rows but {self.noise_store.folder} lacks the noise parameters of "
                             f"{len(missing)} of them (e.g. index {missing[0]}), or holds another method's: the log "
                             "and its noise folder do not belong together; use another output path")
        if self.uses_memory:
            self.memory = RunMemory.open(Path(results), self.memory_fingerprint(ctx), done)

    def memory_fingerprint(self, ctx: RunContext) -> dict[str, Any]:
        """What a saved memory must have been built with: the method's settings, the run's sampling and what the
        run certifies (``ctx.identity``: the checkpoints' sha256 and the data set split)."""
        return {**self.config(), "seed": ctx.seed, "n0": ctx.n0, "n": ctx.n, "alpha": ctx.alpha,
                "dtype": str(ctx.dtype), "num_classes": ctx.num_classes, **ctx.identity, **ctx.mode.config()}

    #: The noise certified for a dataset index of a results log (:meth:`NoiseStore.load`).
    load_noise = staticmethod(NoiseStore.load)
    noise_path = staticmethod(NoiseStore.path)

    def close(self) -> None:
        """Flush and release the memory's files; the memory itself stays, so later inputs are still checked
        against every certificate given so far (only :meth:`open` starts another run's memory)."""
        if self.memory is not None:
            self.memory.close()
