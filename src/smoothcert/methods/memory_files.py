"""The memory's files: regions kept in safetensors chunks, written atomically and fsync'ed; run fingerprints.

Every write goes to a temporary file that is flushed, fsync'ed and renamed over the target, so a crash leaves
either the old file or the new one, never a torn one. A memory's header keeps the fingerprint of the run that
built it (and the configuration in clear), so a resume with another checkpoint, data set or setting is
refused with a message that says which.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from smoothcert.geometry.lowrank import LowRankEllipsoid
from smoothcert.geometry.regions import Ball, CrossPolytope, Ellipsoid, Region

__all__ = ["own_copy", "rebuild_region", "fsync_replace", "atomic_write", "IDENTITY_KEYS", "fingerprint_of",
           "config_json", "plain_config", "why_other_run"]

#: Fingerprint keys that name what a memory was built for, and how a refusal names them.
IDENTITY_KEYS = {"checkpoints": "checkpoint", "dataset": "data set", "split": "data set split"}


def fingerprint_of(config: str | Mapping) -> str:
    """A string that identifies a run: kept as is, or the SHA-256 of a configuration mapping's sorted JSON."""
    if isinstance(config, str):
        return config
    if isinstance(config, Mapping):
        return hashlib.sha256(config_json(config).encode()).hexdigest()
    raise TypeError(f"a run fingerprint is a string or a configuration mapping, got {type(config).__name__}")


def config_json(config: Mapping) -> str:
    """A configuration mapping as sorted, compact JSON (values JSON cannot hold written as strings)."""
    return json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))


def plain_config(config: Mapping) -> dict:
    """The mapping as it reads back from JSON (what a memory's header keeps)."""
    return json.loads(config_json(config))


def why_other_run(saved: Mapping | None, given: str | Mapping) -> str:
    """What differs between the configuration a memory was built with and this run's (for the refusal)."""
    if saved is None or not isinstance(given, Mapping):
        return "its run fingerprint differs"
    given = plain_config(given)
    keys = sorted(set(saved) | set(given), key=lambda k: (k not in IDENTITY_KEYS, k))
    differ = [k for k in keys if saved.get(k) != given.get(k)]
    built_for = [f"another {IDENTITY_KEYS[k]} ({saved.get(k)!r}; this run: {given.get(k)!r})"
                 for k in differ if k in IDENTITY_KEYS]
    settings = [f"{k} {saved.get(k)!r} (this run: {given.get(k)!r})" for k in differ if k not in IDENTITY_KEYS]
    parts = (["it was built for " + ", ".join(built_for)] if built_for else []) + \
        (["it was built with " + ", ".join(settings)] if settings else [])
    return "; ".join(parts) or "its run fingerprint differs"


def own_copy(region: Region) -> Region:
    """A copy whose center and axes share no storage with the caller's tensors (a basis is shared, not copied)."""
    if isinstance(region, Ball):
        return Ball(region.center.clone(), float(region.radius))
    if isinstance(region, CrossPolytope):
        return CrossPolytope(region.center.clone(), region.semi_axes.clone())
    if isinstance(region, LowRankEllipsoid):
        return LowRankEllipsoid(region.center.clone(), region.theta.clone(), region.basis, region.gamma.clone(),
                                region.gap)
    return Ellipsoid(region.center.clone(), region.semi_axes.clone(), region.basis)  # type: ignore[attr-defined]


def rebuild_region(spec: dict, chunk: dict[str, torch.Tensor], index: int) -> Region:
    """The region stored for ``index``: its tensors copied into fresh (aligned) memory the region owns.

    The values are the saved float64 bits; the copies make a reloaded region's tensors like those of a region
    built in the process (own storage, contiguous, allocator-aligned) rather than views into a loaded file.
    """
    center = chunk[f"{index}/center"].clone()
    if spec["kind"] == "ball":
        return Ball(center, float(spec["radius"]))
    if spec["kind"] == "lowrank":
        return LowRankEllipsoid(center, chunk[f"{index}/theta"].clone(), chunk[f"{index}/basis"].clone(),
                                chunk[f"{index}/gamma"].clone(), float(spec["gap"]))
    axes = chunk[f"{index}/axes"].clone()
    if spec["kind"] == "l1":
        return CrossPolytope(center, axes)
    if spec["kind"] == "ellipsoid":
        return Ellipsoid(center, axes, chunk[f"{index}/basis"].clone() if spec["basis"] else None)
    raise ValueError(f"unknown region kind {spec['kind']!r}")


def fsync_replace(tmp: Path, target: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def atomic_write(target: Path, data: bytes) -> None:
    tmp = target.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
