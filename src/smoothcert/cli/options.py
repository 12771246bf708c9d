"""Command-line options made from settings dataclasses, and settings made from the parsed options.

Every field of a :class:`~smoothcert.settings.Settings` dataclass is one option: its flag, help text and kind
(integer, number, choice, switch, text, names) come from the field (:mod:`smoothcert.settings`). Options that
several owners (methods, training objectives) share are declared once; the owners that use an option are named
in its group's title or its help. Options default to ``None`` ("not given"), so a setting that is not given takes
its owner's default, and every value is checked by the settings themselves, with their one message form.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, Field
from typing import Any

from smoothcert.methods.base import CertifyMethod
from smoothcert.settings import (Choice, Integer, Names, Number, Settings, Switch, Text, constraint_of, flag_of,
                                 help_of, setting_fields)

__all__ = ["add_settings_options", "settings_from_args", "add_method_options", "build_method", "dest_of"]


def dest_of(f: Field) -> str:
    """The attribute of the parsed options that holds field ``f`` (from its flag, so owners can share it)."""
    return flag_of(f).lstrip("-").replace("-", "_")


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _default_note(users: Sequence[tuple[str, Field]]) -> str:
    defaults = [(owner, f.default) for owner, f in users
                if f.default is not MISSING and f.default is not None and not isinstance(constraint_of(f), Switch)]
    if not defaults:
        return ""
    if len({_shown(d) for _, d in defaults}) == 1:
        return f" (default {_shown(defaults[0][1])})"
    return " (default " + ", ".join(f"{owner} {_shown(d)}" for owner, d in defaults) + ")"


def _help(entries: Sequence[tuple[str, Field]], name_owners: bool) -> str:
    by_text: dict[str, list[tuple[str, Field]]] = {}
    for owner, f in entries:
        by_text.setdefault(help_of(f), []).append((owner, f))
    parts = []
    for text, users in by_text.items():
        prefix = f"{', '.join(owner for owner, _ in users)}: " if name_owners or len(by_text) > 1 else ""
        parts.append(prefix + text + _default_note(users))
    return "; ".join(parts).replace("%", "%%")


def _kind(flag: str, entries: Sequence[tuple[str, Field]]) -> dict[str, Any]:
    """argparse's arguments for the option of ``entries`` (all of one kind; choices are the union)."""
    kinds = {type(constraint_of(f)) for _, f in entries}
    if len(kinds) != 1:
        raise TypeError(f"{flag} is declared as settings of different kinds by "
                        f"{', '.join(owner for owner, _ in entries)}")
    kind = kinds.pop()
    if kind is Switch:
        return {"action": "store_true", "default": None}
    if kind is Choice:
        union = dict.fromkeys(c for _, f in entries for c in constraint_of(f).choices)
        return {"choices": tuple(union), "default": None}
    types = {Integer: int, Number: float, Text: str, Names: str}
    if kind not in types:
        raise TypeError(f"{flag}: no command-line form for a {kind.__name__} setting")
    return {"type": types[kind], "default": None}


def add_settings_options(parser: argparse.ArgumentParser, owners: Mapping[str, type[Settings]], *,
                         exclude: Iterable[str] = (), title: Callable[[tuple[str, ...]], str] = ", ".join,
                         name_owners: bool = False) -> None:
    """One option per flag among the settings of ``owners`` (``{owner name: settings type}``), except the fields
    named in ``exclude`` (options the command declares itself). Options go into groups titled ``title(users)``
    by the owners that use them; ``name_owners`` also names them in each help text."""
    skip = set(exclude)
    by_flag: dict[str, list[tuple[str, Field]]] = {}
    for owner, settings_type in owners.items():
        for f in setting_fields(settings_type):
            if f.name not in skip:
                by_flag.setdefault(flag_of(f), []).append((owner, f))
    groups: dict[str, Any] = {}
    for flag, entries in by_flag.items():
        users = tuple(dict.fromkeys(owner for owner, _ in entries))
        heading = title(users)
        if heading not in groups:
            groups[heading] = parser.add_argument_group(heading)
        everyone = len(users) == len(owners)
        groups[heading].add_argument(flag, dest=dest_of(entries[0][1]),
                                     help=_help(entries, name_owners and not everyone), **_kind(flag, entries))


def settings_from_args(settings_type: type[Settings], args: argparse.Namespace, **overrides: Any) -> Settings:
    """The settings of ``settings_type`` from parsed options: a field not given takes its default, a given switch
    turns its default around, and ``overrides`` (setting name -> value) win where the settings have that field.
    Raises the settings' own ValueError for a bad value."""
    values = {}
    for f in setting_fields(settings_type):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        given = getattr(args, dest_of(f), None)
        if given is None:
            if f.default is MISSING:
                raise ValueError(f"give {flag_of(f)} ({help_of(f)})")
            continue
        values[f.name] = (not f.default) if isinstance(constraint_of(f), Switch) else given
    return settings_type(**values)


def add_method_options(parser: argparse.ArgumentParser, methods: Iterable[type[CertifyMethod]] | None = None) -> None:
    """The options of the methods' settings (default: every registered method) but ``--sigma``, which the
    command declares; each group is titled by the methods that use its options."""
    classes = list(CertifyMethod.registry.values()) if methods is None else list(methods)
    add_settings_options(parser, {cls.name: cls.settings_type for cls in classes}, exclude=("sigma",),
                         title=lambda users: f"--method {', '.join(users)}")


def build_method(cls: type[CertifyMethod], args: argparse.Namespace, **overrides: Any) -> CertifyMethod:
    """The method ``cls`` built from its settings in ``args`` (with ``overrides``), its sampling budget checked
    against the command's ``--n`` and ``--alpha`` when it has them."""
    method = cls(settings_from_args(cls.settings_type, args, **overrides))
    method.check_sampling(getattr(args, "n", None), getattr(args, "alpha", None))
    return method
