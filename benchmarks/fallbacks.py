"""How often the data-dependent optimizers fall back, collapse or run away, at their default settings.

For each data set (the 2D toys, the 8x8 digits, the MNIST test digits) and method (dds, ancer, rancer, rddrs), runs
the real command line at the method's DEFAULT optimization settings (memory on) with one noise-trained model per
data set, then prints per run: inputs, fall-backs by reason (the ``fallback`` column), inputs whose isotropic scale
sits at the floor (sigma / 100) or above 1, the median proxy radius, certified accuracy at two radii and seconds
per input. The certification sample size ``--n`` does not change the optimization (it draws from its own
streams), so a small ``--n`` measures the fall-backs at the cost of the optimization alone. Resumable; not run in CI.

    python benchmarks/fallbacks.py --out runs/fallbacks --sets toy-curved toy-3class digits mnist
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections import Counter
from pathlib import Path

from smoothcert.cli.main import main as cli

#: Per data set: architecture, training epochs and learning rate of its model, and the two radii of the table.
SETS = {
    "toy-curved": ("mlp", 30, "0.05", (0.25, 0.5)),
    "toy-3class": ("mlp", 30, "0.05", (0.05, 0.1)),
    "digits": ("mnist-cnn", 30, "0.05", (0.25, 0.5)),
    "mnist": ("mnist-cnn", 8, "0.05", (0.25, 0.5)),
}


def model_for(name: str, out: Path, sigma: float) -> str:
    """Train (once) the data set's model under Gaussian noise at ``sigma``; return its checkpoint prefix."""
    arch, epochs, lr, _ = SETS[name]
    checkpoint = out / f"{name}-{arch}-gaussian"
    if not checkpoint.with_suffix(".safetensors").exists():
        code = cli(["train", "--dataset", name, "--arch", arch, "--sigma", str(sigma), "--epochs", str(epochs),
                    "--lr", lr, "--schedule", "cosine", "--seed", "0", "--out", str(checkpoint), "--no-progress"])
        if code:
            raise SystemExit(code)
    return str(checkpoint)


def summarize(path: Path, sigma: float, radii: tuple[float, float], seconds: float | None) -> dict:
    """The table's numbers from one results file."""
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    reasons = Counter(r["fallback"].split(":")[0] for r in rows if r.get("fallback", "none") not in ("", "none"))
    scale = [float(r["scale_iso"]) for r in rows if r.get("scale_iso", "none") != "none"]
    correct = [r for r in rows if r["correct"] == "1"]
    acc = [sum(float(r["radius"]) >= t for r in correct) / len(rows) for t in radii]
    proxy = [float(r["radius_proxy"]) for r in rows if r["predict"] != "-1"]
    return {"inputs": len(rows), "fallbacks": sum(reasons.values()),
            "reasons": ", ".join(f"{k} {v}" for k, v in reasons.items()) or "-",
            "floor": sum(s <= sigma / 100 * (1 + 1e-6) for s in scale), "above1": sum(s > 1 for s in scale),
            "base_kept": sum(r.get("noise_kept") == "base" and r.get("fallback") == "none" for r in rows),
            "median_proxy": statistics.median(proxy) if proxy else 0.0, "acc": acc,
            "seconds": (seconds / len(rows)) if seconds and rows else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/fallbacks"))
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--methods", nargs="+", default=["fixed", "dds", "ancer", "rancer", "rddrs"])
    ap.add_argument("--max", type=int, default=None, help="stop before this dataset index (default: the whole split)")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--inputs-per-batch", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=2500)
    ap.add_argument("--tag", default="", help="suffix of the results files (runs with other --extra options)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="further certify options for the data-dependent methods (e.g. --compare-base 1000)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| set | method | inputs | fall-backs (reasons) | scale at floor | scale > 1 | base kept | median proxy | "
             "acc@r1 | acc@r2 | s/input |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in args.sets:
        checkpoint = model_for(name, args.out, args.sigma)
        radii = SETS[name][3]
        for method in args.methods:
            out = args.out / f"{name}-{method}{args.tag}.tsv"
            t0 = time.perf_counter()
            code = cli(["certify", "--checkpoint", checkpoint, "--split", "test", "--method", method,
                        "--sigma", str(args.sigma), "--n0", "100", "--n", str(args.n), "--alpha", "0.001",
                        "--batch-size", str(args.batch_size), "--inputs-per-batch", str(args.inputs_per_batch),
                        "--seed", "0", "--out", str(out), "--no-progress"]
                       + (["--max", str(args.max)] if args.max is not None else [])
                       + (args.extra if method != "fixed" else []))
            if code:
                raise SystemExit(code)
            s = summarize(out, args.sigma, radii, time.perf_counter() - t0)
            lines.append(f"| {name} | {method}{' ' + ' '.join(args.extra) if args.extra else ''} | {s['inputs']} | {s['fallbacks']} ({s['reasons']}) | {s['floor']} | "
                         f"{s['above1']} | {s['base_kept']} | {s['median_proxy']:.3f} | {s['acc'][0]:.2f} (r {radii[0]}) | "
                         f"{s['acc'][1]:.2f} (r {radii[1]}) | {s['seconds']:.2f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    (args.out / f"table{args.tag}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
