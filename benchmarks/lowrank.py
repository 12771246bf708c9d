"""Low-rank RANCER (or RDDRS) with memory on CIFAR-sized inputs (d = 3,072): peak memory, bytes per certificate.

A small random ReLU conv net (3x32x32 -> 10 classes, built here, seeded) and ``--inputs`` random images scattered
around ``--groups`` points of its decision boundary, so that regions of nearby inputs of different classes meet in
memory and the low-rank distance / intersection tests run at d = 3,072. Certified by ``RANCER(rancer_rank=K)``
(``--method rddrs``: ``RDDRS(rddrs_rank=K)``) with memory on and saved beside a results path (the memory folder and
the noise store, as a command-line run writes them), then printed: peak resident memory (``resource.getrusage``
``ru_maxrss``), the peak of Python-level allocations (``tracemalloc``; torch's own buffers are not traced there,
``ru_maxrss`` holds them), wall time per input, the time of the low-rank distance and intersection calls, the bytes
the memory and the noise store keep per certificate, and what the full-matrix path would keep (a d x d float64
basis per region, plus the d x d Hessian and its eigen-decomposition per input while choosing). ``--full N`` also
runs the full-matrix method on the first N inputs and prints its measured time and peak memory. Not run in CI.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/lowrank.py --inputs 30 --rank 16
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import torch

import smoothcert.geometry.distance as distance_module
import smoothcert.geometry.intersection as intersection_module
from smoothcert.methods.base import RunContext
from smoothcert.methods.rancer import RANCER
from smoothcert.methods.rddrs import RDDRS


def cifar_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(32 * 8 * 8, 10))
    with torch.no_grad():  # sharpen the softmax (random logits differ by ~0.01; the optimizers need p_A > 1/2)
        net[-1].weight.mul_(300.0)
        net[-1].bias.mul_(300.0)
    return net.eval()


def inputs(model: torch.nn.Module, count: int, groups: int, spread: float, offset: float, seed: int = 1
           ) -> torch.Tensor:
    """``groups`` points ``m`` on the base classifier's decision boundary (bisection between two random images ``a``,
    ``b`` of different classes), and ``count`` inputs ``m +- offset u`` (``u`` the unit normal of that boundary at
    ``m``, the gradient of the two logits' difference; the side alternating) plus noise of std ``spread`` per pixel:
    neighbours of different classes, so that memory compares, shrinks and abstains."""
    gen = torch.Generator().manual_seed(seed)
    centers = []
    with torch.no_grad():
        while len(centers) < groups:
            a, b = torch.rand(2, 3, 32, 32, generator=gen)
            ca, cb = model(torch.stack([a, b])).argmax(1).tolist()
            if ca == cb:
                continue
            lo, hi = 0.0, 1.0
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if int(model((a + mid * (b - a))[None]).argmax()) == ca else (lo, mid)
            m = (a + 0.5 * (lo + hi) * (b - a)).requires_grad_(True)
            with torch.enable_grad():
                z = model(m[None])[0]
                (grad,) = torch.autograd.grad(z[cb] - z[ca], m)
            centers.append((m.detach(), grad / torch.linalg.vector_norm(grad)))
    base = torch.stack([c for c, _ in centers])
    unit = torch.stack([u for _, u in centers])
    pick = torch.arange(count) % groups
    side = torch.where((torch.arange(count) // groups) % 2 == 0, -1.0, 1.0)[:, None, None, None]
    moved = base[pick] + side * offset * unit[pick]
    return (moved + spread * torch.randn(count, 3, 32, 32, generator=gen)).clamp(0, 1)


COUNTS = Counter()


def counted(module, name: str, key: str) -> None:
    """Count the rows and the seconds of a low-rank geometry call (distances, intersection tests)."""
    inner = getattr(module, name)

    def wrapper(first, rows):
        t0 = time.perf_counter()
        out = inner(first, rows)
        COUNTS[key] += len(rows)
        COUNTS[key + " s"] += time.perf_counter() - t0
        return out

    setattr(module, name, wrapper)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def run(method, model, x: torch.Tensor, out: Path, args) -> dict:
    if out.parent.exists():
        shutil.rmtree(out.parent)
    out.parent.mkdir(parents=True)
    ctx = RunContext(model, 10, args.n0, args.n, args.alpha, args.batch_size, torch.float32, 0, torch.device("cpu"))
    method.open(ctx, out, [])
    labels = torch.zeros(x.shape[0], dtype=torch.long)
    COUNTS.clear()
    rss0 = rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    records = []
    for s in range(0, x.shape[0], args.inputs_per_batch):
        idx = list(range(s, min(x.shape[0], s + args.inputs_per_batch)))
        records += method.certify(ctx, x[idx], labels[idx], idx)
    wall = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    method.close()
    memory_folder = out.with_name(out.name + ".memory")
    stored = len(method.memory.memory.stored)
    noise_folder = [p for p in out.parent.iterdir() if p.is_dir() and p != memory_folder]
    return {"wall": wall, "rss_before": rss0, "rss_peak": rss_mb(), "py_peak": py_peak / 2**20,
            "stored": stored, "memory_bytes": folder_bytes(memory_folder),
            "noise_bytes": sum(folder_bytes(p) for p in noise_folder),
            "actions": Counter(r.fields["memory"] for r in records), "geometry": dict(COUNTS),
            "radius": [float(r.certificate.radius) for r in records]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/lowrank"))
    ap.add_argument("--inputs", type=int, default=30)
    ap.add_argument("--groups", type=int, default=6, help="points on the decision boundary the inputs scatter around")
    ap.add_argument("--spread", type=float, default=0.001, help="std per pixel of the inputs around those points")
    ap.add_argument("--offset", type=float, default=0.2, help="l2 distance of the inputs from the boundary point")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--sigma", type=float, default=0.12)
    ap.add_argument("--n0", type=int, default=50)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--inputs-per-batch", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="ANCER-stage steps (and DDS steps)")
    ap.add_argument("--samples", type=int, default=16, help="noise samples per optimization step")
    ap.add_argument("--method", choices=("rancer", "rddrs"), default="rancer")
    ap.add_argument("--rddrs-samples", type=int, default=64, help="Monte Carlo samples per RDDRS step")
    ap.add_argument("--full", type=int, default=0, help="also run the full-matrix path on this many inputs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    counted(distance_module, "lowrank_distances", "distances")
    counted(intersection_module, "lowrank_disjoint", "intersection pairs")
    model = cifar_net()
    x = inputs(model, args.inputs, args.groups, args.spread, args.offset)
    d = int(x[0].numel())
    settings = dict(samples=args.samples, dds_steps=args.steps, steps=args.steps)
    if args.method == "rddrs":
        settings["rddrs_samples"] = args.rddrs_samples
    kind, rank = (RANCER, "rancer_rank") if args.method == "rancer" else (RDDRS, "rddrs_rank")
    low = run(kind(args.sigma, **{rank: args.rank}, **settings), model, x, args.out / "lowrank" / "r.tsv", args)
    k = args.rank
    print(f"low-rank {args.method.upper()}, d = {d}, k = {k}, {args.inputs} inputs ({args.groups} groups), n0 = {args.n0}, "
          f"n = {args.n}, {args.steps} DDS + {args.steps} ascent steps x "
          f"{args.samples if args.method == 'rancer' else args.rddrs_samples} samples, 1 thread")
    print(f"  wall {low['wall']:.1f} s ({low['wall'] / args.inputs:.2f} s per input); memory actions "
          f"{dict(low['actions'])}; mean radius {sum(low['radius']) / len(low['radius']):.4f}")
    geo = low["geometry"]
    print(f"  low-rank geometry at d = {d}: {geo.get('distances', 0)} point-to-region distances in "
          f"{geo.get('distances s', 0.0):.2f} s, {geo.get('intersection pairs', 0)} intersection tests (K(t)) in "
          f"{geo.get('intersection pairs s', 0.0):.2f} s")
    print(f"  peak RSS {low['rss_peak']:.0f} MB (before the run {low['rss_before']:.0f} MB); tracemalloc peak "
          f"{low['py_peak']:.1f} MB")
    per = low["memory_bytes"] / max(1, low["stored"])
    print(f"  memory folder {low['memory_bytes'] / 2**20:.2f} MB for {low['stored']} stored regions: "
          f"{per / 2**10:.0f} KB per region (float64 center, theta, {d} x {k} factor, gamma: "
          f"{8 * (d * (k + 2) + k) / 2**10:.0f} KB of tensors); noise store "
          f"{low['noise_bytes'] / max(1, args.inputs) / 2**10:.0f} KB per input")
    print(f"  the full-matrix path would store a {d} x {d} basis per region: {8 * d * d / 2**20:.0f} MB "
          f"(float64, as memory keeps it; {4 * d * d / 2**20:.0f} MB in float32), and build a {d} x {d} Hessian and "
          f"its eigenvectors per input ({2 * 8 * d * d / 2**20:.0f} MB): "
          f"{8 * d * d / max(1.0, per):.0f}x the low-rank region")
    if args.full:
        full = run(kind(args.sigma, **settings), model, x[:args.full], args.out / "full" / "r.tsv", args)
        print(f"full-matrix {args.method.upper()} on {args.full} inputs: wall {full['wall']:.1f} s "
              f"({full['wall'] / args.full:.1f} s per input); peak RSS {full['rss_peak']:.0f} MB (the process so far); "
              f"memory folder {full['memory_bytes'] / 2**20:.1f} MB for {full['stored']} stored regions")


if __name__ == "__main__":
    main()
