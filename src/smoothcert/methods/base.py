"""The plug-in interface of certification methods.

A method turns a batch of inputs into one record each (:mod:`smoothcert.methods.records`), which
:func:`~smoothcert.methods.records.record_row` turns into a result row. Cohen's fixed noise, the data-dependent
methods (which first *choose* a noise per input, then certify it exactly like Cohen on fresh samples) and first-order
certificates are all methods; the runner (:mod:`smoothcert.runner`) and the command line know nothing else
about them. A method registers itself by subclassing :class:`CertifyMethod` with a ``name``, declares its
settings as a :class:`~smoothcert.settings.Settings` dataclass (the command line builds its options from it) and
says what else the command line needs to know as class attributes (``samples_only``, ``columns``).

Every row holds at least ``predict`` (class or -1), ``radius`` (certified l2 radius, 0 when abstaining) and
the :data:`COMMON_COLUMNS`; a method adds its own ``columns`` after those.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from smoothcert.engine.sampling import input_generator
from smoothcert.engine.sequential import Mode, certify_in_mode
from smoothcert.engine.smooth import Certificate
from smoothcert.noise.base import Noise
from smoothcert.methods.records import MethodRecord, record_row
from smoothcert.settings import Settings, number

#: Columns every certification method fills, after Cohen's ``idx label predict radius correct time``.
COMMON_COLUMNS = ("radius_proxy", "p_lower", "gap", "n", "method", "dtype", "sampling", "n_used")


@dataclass
class RunContext:
    """What a method needs to certify: the base classifier and the sampling settings of the run.

    ``block`` samples of each input share a forward pass; it is fixed for the whole run, so an input's random
    numbers do not depend on which inputs share its batch (resume and splits give identical results).
    ``identity`` names what the run certifies (the command line gives the checkpoints' ``sha256`` list as
    ``checkpoints`` and the data set's ``dataset`` and ``split``); state saved for a run, such as the
    certification memory, is refused by a run with another identity.

    ``mode`` (:class:`~smoothcert.engine.sequential.Mode`) says how CERTIFY spends its estimation samples:
    ``fixed`` (``n`` of them, the default), ``target`` or ``anytime`` (sequential, at most ``mode.n_max``);
    :meth:`certify` runs it for the methods whose certify step is Cohen's.
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
    mode: Mode = field(default_factory=Mode)

    @property
    def block(self) -> int:
        return max(1, self.batch_size // self.inputs_per_batch)

    def generators(self, indices: Sequence[int], stream: str) -> list[torch.Generator]:
        """One independent generator per input for the named stream, from the run seed and dataset index."""
        return [input_generator(self.seed, int(i), stream, self.device) for i in indices]

    def certify_generators(self, indices: Sequence[int]) -> list[tuple[torch.Generator, torch.Generator]]:
        """Independent (selection, estimation) streams per input for :func:`smoothcert.smooth.certify`."""
        return list(zip(self.generators(indices, "select"), self.generators(indices, "estimate")))

    def certify(self, x: torch.Tensor, noise: Noise | Sequence[Noise], indices: Sequence[int]) -> list[Certificate]:
        """Cohen's certify step for ``x`` with ``noise`` (one, or one per input) in the run's :attr:`mode`, from the
        inputs' ``select`` / ``estimate`` streams (and ``cp-uniform`` for the randomized bound)."""
        uniforms = self.generators(indices, "cp-uniform") if self.mode.randomized else None
        return certify_in_mode(self.mode, self.model, x, noise, self.num_classes, self.n0, self.n, self.alpha,
                               batch_size=self.batch_size, block=self.block, generators=self.certify_generators(indices),
                               uniform_generators=uniforms, dtype=self.dtype, seed=self.seed)


def sigma_setting() -> Any:
    """The ``sigma`` field every method's settings starts with (the command declares ``--sigma`` itself)."""
    return number(help="noise level in input units, pixels in [0, 1] (default: the checkpoint's training sigma)",
                  low=0.0, low_open=True)


class CertifyMethod(ABC):
    """Base class of certification methods; subclasses register under their ``name``.

    A method is built from its settings, ``Method(settings)`` (a frozen :class:`~smoothcert.settings.Settings`
    dataclass of type ``settings_type``), or from the first setting and keywords, ``Method(0.25, steps=10)``;
    ``keywords`` maps the short keyword names of the constructors to setting names.
    """

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]] = ()
    settings_type: ClassVar[type[Settings]]
    keywords: ClassVar[dict[str, str]] = {}
    #: True for methods that only sample the base classifier (no gradient through it): it may be compiled.
    samples_only: ClassVar[bool] = False
    #: True for methods whose certify step is Cohen's through :meth:`RunContext.certify`, so every mode of
    #: certification (target, anytime, the randomized bound) applies; others run fixed-n CERTIFY only.
    modes: ClassVar[bool] = False
    registry: ClassVar[dict[str, type["CertifyMethod"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            CertifyMethod.registry[cls.name] = cls

    def __init__(self, settings: Any = None, /, **keywords: Any):
        self.settings = self.make_settings(settings, **keywords)

    @classmethod
    def make_settings(cls, settings: Any = None, /, **keywords: Any) -> Settings:
        """``settings`` itself when it is this method's settings, else the settings made from ``settings`` (the
        first field, e.g. sigma) and ``keywords`` (setting names, or the short names of :attr:`keywords`)."""
        if isinstance(settings, Settings):
            if type(settings) is not cls.settings_type:
                raise TypeError(f"{cls.__name__} is built from {cls.settings_type.__name__}, got "
                                f"{type(settings).__name__}")
            if keywords:
                raise TypeError(f"give {cls.__name__} its settings or keywords, not both")
            return settings
        values = {cls.keywords.get(k, k): v for k, v in keywords.items()}
        known = cls.settings_type.field_names()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TypeError(f"{cls.__name__} takes no setting {', '.join(unknown)}; it takes: {', '.join(known)}")
        if settings is not None:
            if known[0] in values:
                raise TypeError(f"{cls.__name__} got {known[0]} twice")
            values[known[0]] = settings
        return cls.settings_type(**values)

    @classmethod
    def row_columns(cls) -> tuple[str, ...]:
        """The columns of this method's rows: ``predict``, ``radius``, the common columns, then its own."""
        return ("predict", "radius", *COMMON_COLUMNS, *(c for c in cls.columns if c not in COMMON_COLUMNS))

    def config(self) -> dict[str, Any]:
        """The method's name and settings, JSON-ready; a run resumes only if they are unchanged."""
        return {"name": self.name, **self.settings.to_dict()}

    @property
    def uses_memory(self) -> bool:
        """Whether the method couples inputs through memory-based certification (off for single inputs)."""
        return False

    def check_sampling(self, n: int | None = None, alpha: float | None = None) -> None:
        """Check, before any sampling, that the run's ``n`` and ``alpha`` suit the settings (default: any)."""

    def check_classes(self, num_classes: int) -> None:
        """Check, before any sampling, that the settings suit a classifier of ``num_classes`` classes (default: any)."""

    def check_inputs(self, x: torch.Tensor) -> None:
        """A ValueError, before any sampling or file, if the method cannot certify inputs ``x`` (default: any)."""

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """Check, before any sampling or file, that inputs of ``shape`` (no batch dimension) suit the settings
        (default: any)."""

    @abstractmethod
    def certify(self, ctx: RunContext, x: torch.Tensor, labels: torch.Tensor, indices: Sequence[int]
                ) -> list[MethodRecord]:
        """One :class:`~smoothcert.methods.records.MethodRecord` per input."""

    def propose(self, ctx: RunContext, x: torch.Tensor, labels: torch.Tensor, indices: Sequence[int]) -> list[Any]:
        """The part of :meth:`certify` that depends on the inputs alone, so it may run in another process (a
        distributed worker); :meth:`finish` turns its result into records. By default the records themselves."""
        return self.certify(ctx, x, labels, indices)

    def finish(self, ctx: RunContext, x: torch.Tensor, labels: torch.Tensor, indices: Sequence[int],
               proposals: Sequence[Any]) -> list[MethodRecord]:
        """The part of :meth:`certify` that couples inputs (memory), run in dataset order by the process that
        writes the results, on :meth:`propose`'s output: ``certify == finish(propose)`` (by default, identity)."""
        return list(proposals)

    def certify_rows(self, ctx: RunContext, x: torch.Tensor, labels: torch.Tensor, indices: Sequence[int]
                     ) -> list[dict[str, Any]]:
        """:meth:`certify`, each record as its row (:func:`~smoothcert.methods.records.record_row`)."""
        return [record_row(r, self.row_columns()) for r in self.certify(ctx, x, labels, indices)]

    def open(self, ctx: RunContext, results: Path, done: Sequence[int]) -> None:
        """Called once before certifying, with the results path and the dataset indices already done.

        Stateful methods (memory, saved noise parameters) load or check their side files here.
        """

    def close(self) -> None:
        """Called after the last batch (also after an error)."""


def method_class(name: str) -> type[CertifyMethod]:
    if name not in CertifyMethod.registry:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(CertifyMethod.registry))}")
    return CertifyMethod.registry[name]
