"""The memory's files: regions kept in safetensors chunks, written atomically and fsync'ed.

Every write goes to a temporary file that is flushed, fsync'ed and renamed over the target, so a crash leaves
either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from smoothcert.geometry.regions import Ball, CrossPolytope, Ellipsoid, Region

__all__ = ["own_copy", "rebuild_region", "fsync_replace", "atomic_write"]


def own_copy(region: Region) -> Region:
    """A copy whose center and axes share no storage with the caller's tensors (a basis is shared, not copied)."""
    if isinstance(region, Ball):
        return Ball(region.center.clone(), float(region.radius))
    if isinstance(region, CrossPolytope):
        return CrossPolytope(region.center.clone(), region.semi_axes.clone())
    return Ellipsoid(region.center.clone(), region.semi_axes.clone(), region.basis)  # type: ignore[attr-defined]


def rebuild_region(spec: dict, chunk: dict[str, torch.Tensor], index: int) -> Region:
    """The region stored for ``index``: its tensors copied into fresh (aligned) memory the region owns.

    The values are the saved float64 bits; the copies make a reloaded region's tensors like those of a region
    built in the process (own storage, contiguous, allocator-aligned) rather than views into a loaded file.
    """
    center = chunk[f"{index}/center"].clone()
    if spec["kind"] == "ball":
        return Ball(center, float(spec["radius"]))
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
