"""Telling results files apart: names that distinguish them, and warnings when they are not comparable."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["comparison_warnings", "distinct_names"]


def comparison_warnings(results: Sequence[Any]) -> list[str]:
    """What makes files hard to compare: other models (checkpoint sha256) or other data (data set, split)."""
    known = [r for r in results if r.config]
    out = []
    for what, key in (("models", lambda c: tuple(x.get("sha256") for x in c.get("checkpoints", []))),
                      ("data", lambda c: (c.get("dataset"), c.get("split")))):
        groups: dict[Any, list[str]] = {}
        for r in known:
            groups.setdefault(key(r.config), []).append(r.name)
        if len(groups) > 1:
            parts = [f"{', '.join(names)}" for names in groups.values()]
            shown = "; ".join(f"{'/'.join(str(v)[:12] for v in k)}: {p}" for k, p in zip(groups, parts))
            out.append(f"the files come from different {what} ({shown}): their numbers are not a like-for-like "
                       "comparison")
    return out


def distinct_names(paths: Sequence[str | Path]) -> list[str]:
    """Names for ``paths`` that tell them apart: the file stem, with as many parent folders as needed."""
    paths = [Path(p) for p in paths]
    for depth in range(1, max((len(p.parts) for p in paths), default=1) + 1):
        names = ["/".join(p.with_suffix("").parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]
