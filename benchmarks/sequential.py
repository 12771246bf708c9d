"""Samples per input of ``--mode target`` and ``--mode anytime`` against fixed-n CERTIFY (n = 100,000), on MNIST.

For each of the first ``--inputs`` test digits, fixed CERTIFY runs exactly as ``smoothcert certify`` runs it (the
same ``select`` / ``estimate`` streams of the run seed and the digit's index, the same ``block``); an observer of
the estimation samples records the running count of the selected class at every check of the sequential
schedule. Because an input's draws depend only on its own stream (and the Gaussian sampler fills whole samples of
784 values in order), the sequential modes' first ``n_k`` estimation samples are exactly the fixed run's first
``n_k``, so their decisions at every radius follow from those prefix counts with the engine's own decision
functions. ``--verify K`` checks that claim: it runs the real engine (``certify_sequential``) on the first ``K``
digits and compares decisions, ``n_used`` and bounds with the replay.

    python benchmarks/sequential.py collect --checkpoint runs/seq/mnist-cnn-s0.25 --sigma 0.25 --out runs/seq/b25.jsonl
    python benchmarks/sequential.py verify  --checkpoint runs/seq/mnist-cnn-s0.25 --sigma 0.25 --out runs/seq/b25.jsonl --inputs 10
    python benchmarks/sequential.py analyze --sigma 0.25 --out runs/seq/b25.jsonl

Resumable (collect appends one JSON line per digit); ``--start S --inputs E`` collects digits ``S..E-1`` only, so
a run splits over processes whose files are then concatenated in order. ``analyze`` also prints what no sequential
rule can beat: fixed-n Clopper-Pearson at the full alpha on the first ``n / 5`` samples. Recorded references:
``benchmarks/results/mnist/sequential-s0.25.jsonl`` and ``-s0.5.jsonl``. Not run in CI.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import numpy as np
import torch

from smoothcert.cli.common import load_base_classifier
from smoothcert.data.datasets import load_dataset
from smoothcert.engine.sampling import input_generator
from smoothcert.engine.sequential import Mode, certify_sequential, target_level
from smoothcert.engine.smooth import certify
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.stats.bounds import clopper_pearson_lower
from smoothcert.stats.sequential import (CERTIFIED, UNDECIDED, anytime_decisions, check_schedule,
                                         target_step)

RADII = (0.25, 0.5, 0.75, 1.0)


class PrefixCounts:
    """Observer: the count of the selected class after the first ``n_k`` estimation samples, for every check,
    and every estimation sample's outcome (selected class or not), so any other schedule can be replayed."""

    def __init__(self, checks):
        self.checks = [int(c) for c in checks]

    def begin(self, classes):
        self.cls, self.done, self.total, self.at, self.hits = classes, 0, 0, {}, []

    def __call__(self, rows, noise, predictions):
        outcome = predictions[0] == self.cls[rows[0]]
        self.hits.append(outcome.numpy().copy())
        hit = outcome.to(torch.int64).cumsum(0)
        m = hit.numel()
        for c in self.checks:
            if self.done < c <= self.done + m:
                self.at[c] = self.total + int(hit[c - self.done - 1])
        self.total += int(hit[-1])
        self.done += m

    def packed(self) -> str:
        """Every outcome in order, as base64 of ``numpy.packbits``."""
        return base64.b64encode(np.packbits(np.concatenate(self.hits))).decode()


def streams(seed, idx, device):
    return [(input_generator(seed, idx, "select", device), input_generator(seed, idx, "estimate", device))]


def collect(args) -> None:
    model, _, _ = load_base_classifier([args.checkpoint], torch.device("cpu"))
    data = load_dataset("mnist", "test")
    done = set()
    if args.out.exists():
        done = {json.loads(line)["idx"] for line in args.out.read_text().splitlines() if line.strip()}
    schedule = check_schedule(args.n, args.first, args.growth)
    noise = IsotropicGaussian(args.sigma)
    with args.out.open("a") as f:
        for idx in range(args.start, args.inputs):
            if idx in done:
                continue
            x, y = data.batch([idx])
            obs = PrefixCounts(schedule)
            (cert,) = certify(model, x, noise, 10, args.n0, args.n, args.alpha, batch_size=args.batch_size,
                              block=args.batch_size, generators=streams(args.seed, idx, x.device), seed=args.seed,
                              observers=[obs])
            top = int(obs.cls[0])
            assert obs.at[args.n] == int(cert.counts[top])
            f.write(json.dumps({"idx": idx, "label": int(y[0]), "top": top, "predict": cert.prediction,
                                "p_lower": cert.p_lower, "radius": cert.radius, "n_a": int(cert.counts[top]),
                                "prefix": [obs.at[int(c)] for c in schedule], "hits": obs.packed()}) + "\n")
            f.flush()


def prefix_counts(row, schedule):
    """The selected class's count after each check of ``schedule``: from the recorded outcomes (any schedule), else
    from the counts recorded at the collection's own checks (then ``schedule`` must be that one)."""
    if "hits" in row:
        hits = np.unpackbits(np.frombuffer(base64.b64decode(row["hits"]), dtype=np.uint8))
        return np.cumsum(hits[: int(schedule[-1])], dtype=np.int64)[schedule - 1].tolist()
    if len(row["prefix"]) != len(schedule):
        raise SystemExit("this file has counts at other checks only (collected before outcomes were recorded)")
    return row["prefix"]


def replay(row, mode: Mode, sigma: float, alpha: float, x=None):
    """What ``certify_sequential`` decides for this digit, from its prefix counts: (certified, radius, n_used)."""
    schedule, alphas = mode.schedule(), mode.spending(alpha)
    noise = IsotropicGaussian(sigma)
    prefix = prefix_counts(row, schedule)
    if mode.name == "target":
        _, level = target_level(noise, torch.zeros(784) if x is None else x, mode.radius)
    if mode.name == "target" and int(target_step([0], -1, schedule, alphas, [level], alpha,
                                                mode.sequence)[0]) != UNDECIDED:
        return False, 0.0, 0
    for k, n_k in enumerate(schedule.tolist()):
        s = prefix[k]
        if mode.name == "target":
            dec = int(target_step([s], k, schedule, alphas, [level], alpha, mode.sequence)[0])
        else:
            dec = int(anytime_decisions([s], n_k, mode.n_max, float(alphas[k]), float(alphas[-1]), mode.precision,
                                        [noise.gap])[0])
        if dec != UNDECIDED:
            break
    if mode.name == "target":
        return dec == CERTIFIED, (mode.radius if dec == CERTIFIED else 0.0), n_k
    p = float(clopper_pearson_lower(s, n_k, float(alphas[k])))
    return p >= 0.5, (noise.sigma_sampled * noise.gap(p) if p >= 0.5 else 0.0), n_k


def load(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def verify(args) -> None:
    model, _, _ = load_base_classifier([args.checkpoint], torch.device("cpu"))
    data = load_dataset("mnist", "test")
    rows = {r["idx"]: r for r in load(args.out)}
    modes = [Mode("target", radius=r, n_max=args.n, first=args.first, growth=args.growth) for r in args.radii]
    if not args.skip_anytime:
        modes.append(Mode("anytime", n_max=args.n, precision=args.precision, first=args.first, growth=args.growth))
    agree = total = 0
    for idx in sorted(rows)[: args.inputs]:
        x, _ = data.batch([idx])
        for mode in modes:
            (cert,) = certify_sequential(model, x, IsotropicGaussian(args.sigma), 10, args.n0, mode, args.alpha,
                                         batch_size=args.batch_size, block=args.batch_size,
                                         generators=streams(args.seed, idx, x.device), seed=args.seed)
            ok, radius, used = replay(rows[idx], mode, args.sigma, args.alpha, x[0])
            same = (not cert.abstained) == ok and cert.n_used == used and abs(cert.radius - radius) <= 1e-12
            agree += same
            total += 1
            if not same:
                print(f"digit {idx} {mode.name} r={mode.radius}: engine ({cert.prediction}, {cert.radius}, "
                      f"{cert.n_used}) replay ({ok}, {radius}, {used})")
    print(f"engine and replay agree on {agree} of {total} (digit, mode) pairs")


def analyze(args) -> None:
    rows = load(args.out)
    sig = args.sigma
    print(f"sigma {sig}: {len(rows)} digits (indices {min(r['idx'] for r in rows)}-{max(r['idx'] for r in rows)}), "
          f"n0 {args.n0}, alpha {args.alpha}, fixed n = {args.n:,}; checks at {check_schedule(args.n, args.first, args.growth).tolist()}")
    print("\n| radius | sequence | fixed cert. acc. | target cert. acc. | mean n (target) | median n | "
          "fixed n / mean n | max n | share n >= 12,800 | share near level |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    noise = IsotropicGaussian(sig)
    for r in args.radii:
        level = float(noise.level(r / noise.sigma_sampled))
        fixed = np.mean([(x["radius"] >= r) and x["predict"] == x["label"] for x in rows])
        # near the level: the fixed run's estimate within 5 standard errors of 10,000 samples of the level
        phat = np.array([x["n_a"] / args.n for x in rows])
        near = np.mean(np.abs(phat - level) <= 5 * np.sqrt(level * (1 - level) / 10_000))
        for seq in args.sequences:
            mode = Mode("target", radius=r, n_max=args.n, sequence=seq, first=args.first, growth=args.growth)
            out = [replay(x, mode, sig, args.alpha) for x in rows]
            acc = np.mean([ok and x["top"] == x["label"] for (ok, _, _), x in zip(out, rows)])
            used = np.array([u for _, _, u in out])
            ratio = f"{args.n / used.mean():.0f}x" if used.mean() else "- (no sample: r above the ceiling)"
            print(f"| {r} | {seq} | {fixed:.2f} | {acc:.2f} | {used.mean():,.0f} | {np.median(used):,.0f} | "
                  f"{ratio} | {used.max():,} | {np.mean(used >= 12_800):.2f} | {near:.2f} |")
    fixed = np.array([x["radius"] if x["predict"] == x["label"] else 0.0 for x in rows])
    ones = np.array([x["n_a"] == args.n for x in rows])
    print(f"\nanytime; fixed ACR {fixed.mean():.4f}; {ones.sum()} of {len(rows)} digits have all {args.n:,} samples in "
          "class A (radius at the ceiling)")
    print("| precision (sigma) | mean n | fixed n / mean n | median n | ACR | (fixed - anytime) ACR / sigma | "
          "median per-input deficit / sigma | share within 0.02 sigma | same, digits below the ceiling |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for precision in args.precisions:
        mode = Mode("anytime", n_max=args.n, precision=precision, first=args.first, growth=args.growth)
        out = [replay(x, mode, sig, args.alpha) for x in rows]
        radius = np.array([rad if x["top"] == x["label"] else 0.0 for (_, rad, _), x in zip(out, rows)])
        used = np.array([u for _, _, u in out])
        deficit = (fixed - radius) / sig
        below = np.mean(deficit[~ones] <= 0.02) if (~ones).any() else float("nan")
        print(f"| {precision} | {used.mean():,.0f} | {args.n / used.mean():.1f}x | {np.median(used):,.0f} | "
              f"{radius.mean():.4f} | {(fixed.mean() - radius.mean()) / sig:.4f} | {np.median(deficit):.4f} | "
              f"{np.mean(deficit <= 0.02):.2f} | {below:.2f} |")
    # what no sequential rule can beat: fixed-n Clopper-Pearson at the full alpha on the first n / 5 samples
    m = args.n // 5
    best = [float(clopper_pearson_lower(prefix_counts(x, np.array([m]))[0], m, args.alpha)) for x in rows]
    radius = np.array([noise.sigma_sampled * noise.gap(p) if p >= 0.5 and x["top"] == x["label"] else 0.0
                       for p, x in zip(best, rows)])
    deficit = (fixed - radius) / sig
    print(f"\nfixed n = {m:,} at the full alpha (a bound that knew in advance when to stop, with no sequential "
          f"cost): median deficit {np.median(deficit):.4f} sigma, share within 0.02 sigma {np.mean(deficit <= 0.02):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["collect", "verify", "analyze"])
    ap.add_argument("--checkpoint")
    ap.add_argument("--sigma", type=float, required=True)
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, one per digit")
    ap.add_argument("--inputs", type=int, default=100)
    ap.add_argument("--start", type=int, default=0, help="collect: the first test digit (to split a run over processes)")
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=100_000, help="fixed n, and n_max of the sequential modes")
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--first", type=int, default=Mode.first, help="samples before the first check")
    ap.add_argument("--growth", type=float, default=Mode.growth, help="each check at this many times the previous")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--radii", type=float, nargs="+", default=list(RADII))
    ap.add_argument("--sequences", nargs="+", default=["cp", "betting"])
    ap.add_argument("--precision", type=float, default=0.02, help="verify: the anytime precision")
    ap.add_argument("--precisions", type=float, nargs="+", default=[0.02, 0.05, 0.1], help="analyze: anytime precisions")
    ap.add_argument("--skip-anytime", action="store_true", help="verify: the target modes only (anytime is slow)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"collect": collect, "verify": verify, "analyze": analyze}[args.step](args)


if __name__ == "__main__":
    main()
