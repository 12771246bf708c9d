"""Typed settings: frozen dataclasses whose fields declare their constraint and their help text.

A settings class derives from :class:`Settings` (a frozen dataclass) and declares every field with one of
:func:`integer`, :func:`number`, :func:`choice`, :func:`switch`, :func:`text` or :func:`names`, which put the
field's :class:`Constraint`, its help text and its command-line flag into the field's metadata. Settings are
validated when they are made (:func:`validate`), so an instance is always valid; a bad value raises one
``ValueError`` of the form

    NAME (--flag) must be <what is allowed>, got <the value>

before any work starts. :meth:`Settings.to_dict` and :meth:`Settings.from_dict` convert to and from a JSON-ready
dict (what a results sidecar or a checkpoint stores). The command line builds its options from these fields
(:mod:`smoothcert.cli.options`); nothing here knows about argparse.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass
from typing import Any, TypeVar

__all__ = ["Constraint", "Integer", "Number", "Choice", "Switch", "Text", "Names", "Settings", "validate",
           "integer", "number", "choice", "switch", "text", "names", "constraint_of", "help_of", "flag_of",
           "label_of", "setting_fields"]

_CONSTRAINT, _HELP, _FLAG = "smoothcert.constraint", "smoothcert.help", "smoothcert.flag"

S = TypeVar("S", bound="Settings")


class Constraint(ABC):
    """What values a setting allows; ``optional`` settings also allow ``None``."""

    optional: bool = False

    @abstractmethod
    def describe(self) -> str:
        """The allowed values, phrased to follow "must be" (e.g. ``an integer >= 1``)."""

    @abstractmethod
    def accepts(self, value: Any) -> bool:
        """Whether ``value`` (never None) is allowed."""

    def convert(self, value: Any) -> Any:
        """The canonical form of an accepted value (e.g. a float for a number)."""
        return value

    def check(self, name: str, value: Any) -> Any:
        """The canonical value, or a ValueError ``NAME must be ..., got ...``."""
        if value is None and self.optional:
            return None
        if value is None or not self.accepts(value):
            allowed = self.describe() + (" or None" if self.optional else "")
            raise ValueError(f"{name} must be {allowed}, got {value!r}")
        return self.convert(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Integer(Constraint):
    """A whole number in ``[low, high]`` (either end may be open-ended: None)."""

    low: int | None = None
    high: int | None = None
    optional: bool = False

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"an integer in [{self.low}, {self.high}]"
        if self.low is not None:
            return f"an integer >= {self.low}"
        return f"an integer <= {self.high}" if self.high is not None else "an integer"

    def accepts(self, value: Any) -> bool:
        return (_is_integer(value) and (self.low is None or value >= self.low)
                and (self.high is None or value <= self.high))


@dataclass(frozen=True)
class Number(Constraint):
    """A finite real number between ``low`` and ``high``, each end closed unless ``low_open`` / ``high_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"a finite number in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"a finite number {'<' if self.high_open else '<='} {self.high:g}"
        return "a finite number"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def convert(self, value: Any) -> float:
        return float(value)


@dataclass(frozen=True)
class Choice(Constraint):
    """One of the named ``choices``."""

    choices: tuple[str, ...]
    optional: bool = False

    def describe(self) -> str:
        return "one of " + ", ".join(self.choices)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.choices


@dataclass(frozen=True)
class Switch(Constraint):
    """True or False."""

    optional: bool = False

    def describe(self) -> str:
        return "True or False"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)


@dataclass(frozen=True)
class Text(Constraint):
    """A non-empty string (its meaning is checked by whoever parses it)."""

    optional: bool = False

    def describe(self) -> str:
        return "a non-empty string"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())


@dataclass(frozen=True)
class Names(Constraint):
    """A non-empty list of names among ``choices``, given as a sequence or as a comma-separated string."""

    choices: tuple[str, ...]
    optional: bool = False

    def describe(self) -> str:
        return f"a non-empty list of names among {', '.join(self.choices)} (a sequence or comma-separated)"

    @staticmethod
    def _items(value: Any) -> list[Any] | None:
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        if isinstance(value, Sequence):
            return list(value)
        return None

    def accepts(self, value: Any) -> bool:
        items = self._items(value)
        return bool(items) and all(isinstance(s, str) and s in self.choices for s in items)

    def convert(self, value: Any) -> tuple[str, ...]:
        return tuple(self._items(value))


# ----------------------------------------------------------------------------------------------------------------
# Declaring fields
# ----------------------------------------------------------------------------------------------------------------


def _field(default: Any, constraint: Constraint, help: str, flag: str | None) -> Any:
    if not help:
        raise ValueError("every setting needs its help text")
    metadata = {_CONSTRAINT: constraint, _HELP: help, _FLAG: flag}
    return dataclasses.field(default=default, metadata=metadata)


def integer(default: Any = MISSING, *, help: str, low: int | None = None, high: int | None = None,
            optional: bool = False, flag: str | None = None) -> Any:
    """A field holding an :class:`Integer`."""
    return _field(default, Integer(low, high, optional), help, flag)


def number(default: Any = MISSING, *, help: str, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, optional: bool = False, flag: str | None = None) -> Any:
    """A field holding a :class:`Number`."""
    return _field(default, Number(low, high, low_open, high_open, optional), help, flag)


def choice(default: Any = MISSING, choices: Sequence[str] = (), *, help: str, flag: str | None = None) -> Any:
    """A field holding one of ``choices``."""
    return _field(default, Choice(tuple(choices)), help, flag)


def switch(default: bool, *, help: str, flag: str | None = None) -> Any:
    """A field holding True or False; its flag turns the default around (``--no-NAME`` for a default True)."""
    return _field(default, Switch(), help, flag)


def text(default: Any = MISSING, *, help: str, optional: bool = False, flag: str | None = None) -> Any:
    """A field holding a non-empty string."""
    return _field(default, Text(optional), help, flag)


def names(default: Any = MISSING, choices: Sequence[str] = (), *, help: str, flag: str | None = None) -> Any:
    """A field holding a tuple of names among ``choices``."""
    return _field(default, Names(tuple(choices)), help, flag)


def constraint_of(f: dataclasses.Field) -> Constraint:
    try:
        return f.metadata[_CONSTRAINT]
    except KeyError:
        raise TypeError(f"setting {f.name!r} was not declared with smoothcert.settings (no constraint)") from None


def help_of(f: dataclasses.Field) -> str:
    return f.metadata[_HELP]


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag: the declared one, else ``--name-with-dashes`` (``--no-name`` for a switch on by
    default)."""
    if f.metadata.get(_FLAG):
        return f.metadata[_FLAG]
    dashed = f.name.replace("_", "-")
    return f"--no-{dashed}" if isinstance(constraint_of(f), Switch) and f.default is True else f"--{dashed}"


def label_of(f: dataclasses.Field) -> str:
    """How messages name a setting: ``name (--flag)``."""
    return f"{f.name} ({flag_of(f)})"


def setting_fields(settings: Settings | type[Settings]) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(settings)


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------


def validate(settings: Settings) -> Settings:
    """Check every field against its constraint and store its canonical value; raise the first error as
    ``NAME (--flag) must be ..., got ...``. Returns ``settings``."""
    if not dataclasses.is_dataclass(settings) or isinstance(settings, type):
        raise TypeError(f"settings must be a settings dataclass instance, got {settings!r}")
    for f in dataclasses.fields(settings):
        value = constraint_of(f).check(label_of(f), getattr(settings, f.name))
        object.__setattr__(settings, f.name, value)
    return settings


@dataclass(frozen=True)
class Settings:
    """Base of every settings dataclass: validated on creation, converted to and from JSON-ready dicts."""

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        """``{name: value}`` in field order; tuples become lists (as JSON stores them)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any]) -> S:
        """The settings of :meth:`to_dict`'s dict; a missing key takes its default, an unknown key is an error."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__} must be read from a mapping of setting names to values, got {data!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__} has no setting {', '.join(unknown)}; it has: {', '.join(known)}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ValueError(f"{cls.__name__} needs the setting {', '.join(missing)}")
        return cls(**data)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
