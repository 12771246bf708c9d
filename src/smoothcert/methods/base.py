"""The plug-in interface of certification methods.

A method turns a batch of inputs into one result row each. Cohen's fixed noise, the data-dependent methods
(which first *choose* a noise per input, then certify it exactly like Cohen on fresh samples) and first-order
certificates are all methods; the runner (:mod:`smoothcert.runner`) and the command line know nothing else
about them. A method registers itself by subclassing :class:`CertifyMethod` with a ``name``.

Every row holds at least ``predict`` (class or -1), ``radius`` (certified l2 radius, 0 when abstaining) and
the :data:`COMMON_COLUMNS`; a method adds its own ``columns`` after those.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from smoothcert.engine.sampling import input_generator
from smoothcert.engine.smooth import Certificate

#: Columns every certification method fills, after Cohen's ``idx label predict radius correct time``.
COMMON_COLUMNS = ("radius_proxy", "p_lower", "gap", "n", "method", "dtype")


@dataclass
class RunContext:
    """What a method needs to certify: the base classifier and the sampling settings of the run.

    ``block`` samples of each input share a forward pass; it is fixed for the whole run, so an input's random
    numbers do not depend on which inputs share its batch (resume and splits give identical results).
    ``identity`` names what the run certifies (the command line gives the checkpoints' ``sha256`` list as
    ``checkpoints`` and the data set's ``dataset`` and ``split``); state saved for a run, such as the
    certification memory, is refused by a run with another identity.
    """

    model: torch.nn.Module
    num_classes: int
    n0: int
    n: int
    alpha: float
    batch_size: int
    dtype: torch.dtype
    seed: int
    device: torch.device
    inputs_per_batch: int = 1
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def block(self) -> int:
        return max(1, self.batch_size // self.inputs_per_batch)

    def generators(self, indices: Sequence[int], stream: str) -> list[torch.Generator]:
        """One independent generator per input for the named stream, from the run seed and dataset index."""
        return [input_generator(self.seed, int(i), stream, self.device) for i in indices]

    def certify_generators(self, indices: Sequence[int]) -> list[tuple[torch.Generator, torch.Generator]]:
        """Independent (selection, estimation) streams per input for :func:`smoothcert.smooth.certify`."""
        return list(zip(self.generators(indices, "select"), self.generators(indices, "estimate")))


def certificate_row(cert: Certificate, method: str) -> dict[str, Any]:
    """The common columns of a row from a :class:`~smoothcert.smooth.Certificate`."""
    return {
        "predict": cert.prediction,
        "radius": cert.radius,
        "radius_proxy": cert.radius_proxy,
        "p_lower": cert.p_lower,
        "gap": cert.gap,
        "n": cert.n,
        "method": method,
        "dtype": cert.dtype,
    }


class CertifyMethod(ABC):
    """Base class of certification methods; subclasses register under their ``name``."""

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]] = ()
    registry: ClassVar[dict[str, type["CertifyMethod"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            CertifyMethod.registry[cls.name] = cls

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this method's command-line options (names must not clash with other methods')."""

    @classmethod
    @abstractmethod
    def from_args(cls, args: argparse.Namespace) -> "CertifyMethod":
        """Build the method from parsed command-line options."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serializable settings; a run resumes only if they are unchanged."""

    @abstractmethod
    def certify(self, ctx: RunContext, x: torch.Tensor, labels: torch.Tensor, indices: Sequence[int]
                ) -> list[dict[str, Any]]:
        """One row per input (``predict``, ``radius``, the common columns, then ``columns``)."""

    def open(self, ctx: RunContext, results: Path, done: Sequence[int]) -> None:
        """Called once before certifying, with the results path and the dataset indices already done.

        Stateful methods (memory, saved noise parameters) load or check their side files here.
        """

    def close(self) -> None:
        """Called after the last batch (also after an error)."""


def argument_group_once(parser: argparse.ArgumentParser, title: str) -> Any:
    """A new argument group ``title`` on ``parser``, or None when a method has already added it there (methods
    share option groups, and the command line adds every method's options to one parser)."""
    added = parser.__dict__.setdefault("_smoothcert_groups", set())
    if title in added:
        return None
    added.add(title)
    return parser.add_argument_group(title)


def method_class(name: str) -> type[CertifyMethod]:
    if name not in CertifyMethod.registry:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(CertifyMethod.registry))}")
    return CertifyMethod.registry[name]
