"""Pictures of certified regions on 2D data (like seed 000 figure 1.1).

:func:`plot_regions` draws the decision regions of the base classifier on a grid, the test points, and around
chosen points the certified region of each method: the ball of fixed smoothing and DDS, the axis-aligned
ellipse of ANCER, the rotated ellipses of RANCER and RDDRS, from the methods' records. Each region is the one the
method certifies for that input alone (memory-based certification, which couples inputs, is off for the picture).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from smoothcert.methods.base import CertifyMethod, RunContext
from smoothcert.evaluation.plots import save_figure
from smoothcert.geometry.regions import Ball, Ellipsoid, Region

#: Region colours, one per method in the order the methods are drawn (then again from the start).
PALETTE = ("black", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:olive")


def method_regions(method: CertifyMethod, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]
                   ) -> list[Region | None]:
    """The certified region (None when abstaining) of ``method`` for each input of ``x``, without memory."""
    if method.uses_memory:
        raise ValueError("plot-regions draws each input's own certificate: build the method with memory off")
    records = method.certify(ctx, x, torch.zeros(len(x), dtype=torch.long), indices)
    return [record.certified_region for record in records]


def _patch(region: Region, color: str, label: str | None):
    from matplotlib.patches import Circle, Ellipse

    c = region.center.cpu().numpy()
    if isinstance(region, Ball):
        return Circle(c, region.radius, fill=False, color=color, lw=1.6, label=label)
    if isinstance(region, Ellipsoid):
        a = region.semi_axes.cpu().numpy()
        basis = np.eye(2) if region.basis is None else region.basis.cpu().numpy()
        angle = math.degrees(math.atan2(basis[1, 0], basis[0, 0]))
        return Ellipse(c, 2 * a[0], 2 * a[1], angle=angle, fill=False, color=color, lw=1.6, label=label)
    raise TypeError(f"cannot draw a {type(region).__name__}")


def plot_regions(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, points: Sequence[int],
                 methods: Sequence[CertifyMethod], out: str | Path, *, num_classes: int, n0: int = 100,
                 n: int = 10_000, alpha: float = 0.001, seed: int = 0, batch_size: int = 2000) -> Path:
    """Write a PNG with decision regions, the data and each method's certified region around ``points``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if inputs.ndim != 2 or inputs.shape[1] != 2:
        raise ValueError(f"plot-regions needs 2D inputs, got shape {tuple(inputs.shape[1:])}")
    if not points or min(points) < 0 or max(points) >= len(inputs):
        raise ValueError(f"points must be indices in [0, {len(inputs)}), got {list(points)}")
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    ctx = RunContext(model, num_classes, n0, n, alpha, batch_size, torch.float32, seed, device,
                     inputs_per_batch=len(points))
    x = inputs[list(points)].to(device)

    fig, ax = plt.subplots(figsize=(6.5, 6), dpi=130)
    lo = float(inputs.min()) - 0.1
    hi = float(inputs.max()) + 0.1
    grid = torch.linspace(lo, hi, 300)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    with torch.inference_mode():
        decision = model(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1).to(device)).argmax(1).cpu()
    from matplotlib.colors import ListedColormap

    palette = plt.get_cmap("tab10").colors[-num_classes:]
    ax.contourf(gx.numpy(), gy.numpy(), decision.reshape(gx.shape).numpy(), levels=np.arange(num_classes + 1) - 0.5,
                cmap=ListedColormap(palette), alpha=0.18)
    ax.scatter(inputs[:, 0], inputs[:, 1], c=labels, cmap=ListedColormap(palette), s=6, alpha=0.6,
               vmin=-0.5, vmax=num_classes - 0.5)
    ax.scatter(x[:, 0].cpu(), x[:, 1].cpu(), marker="x", color="black", s=40, zorder=5)
    for index, (px, py) in zip(points, x.cpu().tolist()):  # number the certified points by dataset index
        ax.annotate(str(index), (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8, zorder=6)
    for number, method in enumerate(methods):
        color = PALETTE[number % len(PALETTE)]
        regions = method_regions(method, ctx, x, list(points))
        label = f"{method.name} ({sum(r is None for r in regions)} abstained)"
        for region in regions:
            if region is not None:
                ax.add_patch(_patch(region, color, label))
                label = None
        if label is not None:
            ax.plot([], [], color=color, label=label)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("input coordinate x1")
    ax.set_ylabel("input coordinate x2")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"certified regions around the numbered points (dataset indices), n = {n:,}, alpha = {alpha}\n"
                 "background: the base classifier's predicted class; dots: the split's inputs by label",
                 fontsize=8)
    return save_figure(fig, out)
