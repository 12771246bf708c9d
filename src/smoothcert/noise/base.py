"""The plug-in interface of smoothing distributions, and the registry that rebuilds a saved one.

A noise family owns its sampler (:meth:`Noise.fill_`, on the buffer's device from a caller's
``torch.Generator``), its gap (``p_A -> certified level``) and the certified region the gap gives. The engine
and the methods only call this interface; nothing outside a family's module branches on the family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from smoothcert.geometry.regions import Region
from smoothcert.stats.bounds import gap as normal_gap

__all__ = ["Noise", "noise_from_parameters"]


class Noise(ABC):
    """A smoothing distribution for one input of ``d`` values."""

    kind: str = "noise"
    registry: dict[str, type["Noise"]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Noise.registry[cls.kind] = cls

    @classmethod
    def from_parameters(cls, params: dict[str, torch.Tensor]) -> "Noise":
        """Rebuild from :meth:`parameters` (default: the parameters are the constructor's arguments)."""
        return cls(**params)

    @abstractmethod
    def fill_(self, out: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Overwrite ``out`` (shape ``(m, *input_shape)``) with ``m`` independent draws; return it."""

    @abstractmethod
    def region(self, center: torch.Tensor, gap: float) -> Region:
        """The certified region around ``center`` for a certified ``gap = Phi^-1(p_A) >= 0``."""

    @abstractmethod
    def scales(self) -> torch.Tensor:
        """Semi-axis scales of the noise (``theta``; ``sigma`` repeated for isotropic), float64 (d,) or scalar."""

    @abstractmethod
    def parameters(self) -> dict[str, torch.Tensor]:
        """The tensors that define this noise, for saving beside a results log."""

    def draw(self, num: int, shape: tuple[int, ...], generator: torch.Generator | None = None,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``num`` independent draws of shape ``(num, *shape)``."""
        return self.fill_(torch.empty((num, *shape), device=device, dtype=dtype), generator)

    def gap(self, p_lower: float) -> float:
        """The gap certified by a lower bound ``p_lower >= 1/2`` of the top class's probability.

        ``Phi^-1(p_lower)`` for Gaussian noise (seed 000 eq. 3.3); other families override it.
        """
        return float(normal_gap(p_lower))

    def radius(self, gap: float) -> float:
        """Inscribed l2 radius of the region for ``gap``: ``gap * min(scales)``."""
        return float(gap) * float(torch.as_tensor(self.scales()).min())

    def proxy_radius(self, gap: float) -> float:
        """ANCER's proxy radius (seed 000 eq. 3.14): ``gap * exp(mean(log scales))``."""
        return float(gap) * float(torch.exp(torch.log(torch.as_tensor(self.scales(), dtype=torch.float64)).mean()))



def noise_from_parameters(kind: str, params: dict[str, torch.Tensor]) -> Noise:
    """Rebuild a noise saved with :meth:`Noise.parameters` (e.g. from a safetensors file beside a log)."""
    if kind not in Noise.registry:
        raise ValueError(f"unknown noise kind {kind!r}; known: {', '.join(sorted(Noise.registry))}")
    return Noise.registry[kind].from_parameters(params)
