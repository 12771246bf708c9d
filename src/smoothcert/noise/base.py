"""The plug-in interface of smoothing distributions, and the registry that rebuilds a saved one.

A noise family owns its sampler (:meth:`Noise.fill_`, on the buffer's device from a caller's
``torch.Generator``), its gap (``p_A -> certified level``) and the certified region the gap gives. The engine
and the methods only call this interface; nothing outside a family's module branches on the family.

**The region is the sampled noise's region.** The engine draws noise in ``SAMPLE_DTYPE`` (float32), so a
family rounds its parameters to float32 once, at construction (:func:`as_sampled`), keeps those values (as
float64 tensors) and computes its region from exactly them: the sampler multiplies by the same numbers
bitwise, in float32 or float64 buffers alike (:meth:`Noise.on_buffer` refuses narrower ones, which would
round the parameters again).
"""

from __future__ import annotations

import math

from abc import ABC, abstractmethod

import torch

from smoothcert.geometry.norms import NormRadii
from smoothcert.geometry.regions import Region
from smoothcert.stats.bounds import gap as normal_gap
from smoothcert.stats.bounds import level as normal_level

__all__ = ["Noise", "noise_from_parameters", "SAMPLE_DTYPE", "as_sampled"]

#: The dtype the engine draws noise in (:func:`~smoothcert.engine.sampling.sample_counts` fills a float32 buffer).
SAMPLE_DTYPE = torch.float32
_EXACT_BUFFERS = (torch.float32, torch.float64)  # dtypes that hold every float32 parameter exactly


def as_sampled(values: torch.Tensor) -> torch.Tensor:
    """``values`` rounded to :data:`SAMPLE_DTYPE`, as float64: exactly the numbers the sampler multiplies by."""
    return torch.as_tensor(values).detach().to(SAMPLE_DTYPE).to(torch.float64)


class Noise(ABC):
    """A smoothing distribution for one input of ``d`` values."""

    kind: str = "noise"
    #: How the family's draws are made, recorded in every row: ``float`` (noise drawn in floating point and added
    #: to the input) or ``sound`` (exact draws on the input's grid, :mod:`smoothcert.noise.discrete`).
    sampling: str = "float"
    registry: dict[str, type["Noise"]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "gap" in cls.__dict__ and "level" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} defines gap without level: a test of p_A >= level(g) (--mode target) "
                            "needs the inverse of the family's own gap (Noise.level_by_search gives one)")
        Noise.registry[cls.kind] = cls

    @classmethod
    def from_parameters(cls, params: dict[str, torch.Tensor]) -> "Noise":
        """Rebuild from :meth:`parameters` (default: the parameters are the constructor's arguments)."""
        return cls(**params)

    @abstractmethod
    def fill_(self, out: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Overwrite ``out`` (shape ``(m, *input_shape)``) with ``m`` independent draws; return it."""

    def perturb_(self, out: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None,
                 noise_out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Overwrite ``out`` (``(m, *input_shape)``) with ``m`` noisy copies of the one input ``x``.

        Returns ``None``, or a bool ``(m,)`` mask of *void* samples, which the engine counts for no class (a family
        whose draws can fail says so here). ``noise_out``, if given, receives the noise ``out - x`` as drawn. The
        default is ``x + noise`` with the noise from :meth:`fill_`; a family that perturbs otherwise (e.g. in the
        integer space of a pixel grid) overrides this.
        """
        self.fill_(out, generator)
        if noise_out is not None:
            noise_out.copy_(out)
        out.add_(x)
        return None

    def check_support(self, x: torch.Tensor) -> None:
        """A ValueError, before any sampling, if this family cannot smooth the inputs ``x`` (default: any)."""

    @abstractmethod
    def region(self, center: torch.Tensor, gap: float) -> Region:
        """The certified region around ``center`` for a certified ``gap = Phi^-1(p_A) >= 0``."""

    @abstractmethod
    def scales(self) -> torch.Tensor:
        """Semi-axis scales of the certified region per unit gap (``theta``, ``sigma``, ``C``'s eigenvalues), as
        sampled; float64 (d,) or scalar."""

    @abstractmethod
    def parameters(self) -> dict[str, torch.Tensor]:
        """The tensors that define this noise, for saving beside a results log."""

    @staticmethod
    def check_buffer(out: torch.Tensor) -> None:
        """A TypeError unless ``out`` holds float32 parameters exactly (float32 or float64)."""
        if out.dtype not in _EXACT_BUFFERS:
            raise TypeError(f"noise is drawn into float32 or float64 buffers (which hold its float32 parameters "
                            f"exactly, so the certified region is the sampled noise's), got {out.dtype}")

    @classmethod
    def on_buffer(cls, parameter: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``parameter`` on ``out``'s device and dtype (see :meth:`check_buffer`): the same values, bitwise."""
        cls.check_buffer(out)
        return parameter.to(device=out.device, dtype=out.dtype)

    def draw(self, num: int, shape: tuple[int, ...], generator: torch.Generator | None = None,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``num`` independent draws of shape ``(num, *shape)``."""
        return self.fill_(torch.empty((num, *shape), device=device, dtype=dtype), generator)

    def gap(self, p_lower: float) -> float:
        """The gap certified by a lower bound ``p_lower >= 1/2`` of the top class's probability.

        ``Phi^-1(p_lower)`` for Gaussian noise (seed 000 eq. 3.3); other families override it.
        """
        return float(normal_gap(p_lower))

    def norm_radii(self, p_lower: float, gap: float, region: Region) -> NormRadii:
        """The certified radius in each of l1, l2, l_inf (:class:`~smoothcert.geometry.norms.NormRadii`).

        Default (the Gaussian families): the l2 radius of the region (:attr:`Region.inscribed_radius`) is native,
        the l1 and l_inf radii follow from it by the norm inequalities. A family with other native certificates
        (Laplace, uniform) overrides this.
        """
        return NormRadii.from_certified({"l2": region.inscribed_radius}, region.dim)

    def level(self, gap: float) -> float:
        """The inverse of :meth:`gap`: the top-class probability whose certified gap is ``gap`` (``Phi(gap)`` for
        Gaussian noise). A sequential test of ``p_A >= level(g)`` certifies the region at gap ``g``. A family that
        overrides :meth:`gap` overrides this too (enforced when the class is defined)."""
        return float(normal_level(gap))

    def level_by_search(self, gap: float, start: float = 0.5) -> float:
        """The least ``p`` in ``[start, 1)`` with ``self.gap(p) >= gap`` (to within one ulp of the bracket), by
        bisection (``gap`` nondecreasing in ``p``), returned at the upper end so that ``gap(p) >= gap`` holds;
        1.0 (never certifiable) when even the largest double below 1 falls short."""
        lo, hi = float(start), math.nextafter(1.0, 0.0)
        if self.gap(hi) < gap:
            return 1.0
        if self.gap(lo) >= gap:
            return lo
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if not lo < mid < hi:
                break
            if self.gap(mid) >= gap:
                hi = mid
            else:
                lo = mid
        return hi


def noise_from_parameters(kind: str, params: dict[str, torch.Tensor]) -> Noise:
    """Rebuild a noise saved with :meth:`Noise.parameters` (e.g. from a safetensors file beside a log)."""
    if kind not in Noise.registry:
        raise ValueError(f"unknown noise kind {kind!r}; known: {', '.join(sorted(Noise.registry))}")
    return Noise.registry[kind].from_parameters(params)
