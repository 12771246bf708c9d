"""Certification on Ray workers against one process: throughput with 1 and 2 workers, and the overhead per input.

Certifies the first ``--inputs`` MNIST test digits with Cohen's CERTIFY (n0 100, ``--n`` 1,000, alpha 0.001) on a
noise-trained MNIST CNN, ``--rounds`` times, each round in the order local, 1 worker, 2 workers (interleaved, since
timings on a shared machine drift). One local Ray (127.0.0.1) serves every distributed run. Reported per mode:

- seconds per input in the steady state (from the first row written to the last, so the workers' one-time start,
  which loads the model and the data, is left out), and the throughput relative to the local run;
- the overhead per input of the 1-worker run: its steady-state seconds per input minus the worker's own
  certification seconds per input (the rows' ``time``), as a share of the latter (target: under 5%).

    python benchmarks/distributed.py --rounds 3 --inputs 60
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

from smoothcert.cli.distributed import run_distributed  # noqa: E402
from smoothcert.cli.main import build_parser, certify_state, main as cli, worker_state  # noqa: E402
from smoothcert.cli.runner import CERTIFY_COLUMNS, ResultsFile, run_dataset  # noqa: E402
from smoothcert.methods.base import COMMON_COLUMNS  # noqa: E402


def timed_run(argv: list[str], workers: int) -> tuple[float, float, int]:
    """Certify; returns (steady-state seconds per input, mean row ``time``, inputs in the steady state)."""
    args = build_parser().parse_args(argv)
    method, ctx, inputs, indices, run = certify_state(args)
    columns = CERTIFY_COLUMNS + COMMON_COLUMNS + tuple(c for c in method.columns if c not in COMMON_COLUMNS)
    results = ResultsFile(Path(args.out), columns, {"command": "certify", **run, "n0": args.n0,
                                                    "method": method.config()})
    stamps: list[tuple[float, int]] = []
    append = results.append

    def stamped(rows):
        append(rows)
        stamps.append((time.perf_counter(), len(rows)))

    results.append = stamped
    if workers:
        run_distributed(results, inputs, indices, method, ctx, partial(worker_state, args), workers=workers,
                        inputs_per_batch=args.inputs_per_batch, progress=False)
    else:
        run_dataset(results, inputs, indices, lambda x, y, idx: method.certify(ctx, x, y, idx),
                    inputs_per_batch=args.inputs_per_batch, progress=False)
    span = stamps[-1][0] - stamps[0][0]
    count = sum(k for _, k in stamps[1:])
    with open(args.out) as f:
        row_time = statistics.mean(float(r["time"]) for r in csv.DictReader(f, delimiter="\t"))
    return span / count, row_time, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="MNIST model (default: train the demo's into --out)")
    ap.add_argument("--out", type=Path, default=Path("runs/distributed"))
    ap.add_argument("--inputs", type=int, default=60)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or str(args.out / "mnist-cnn-gaussian")
    if not Path(checkpoint + ".safetensors").exists():
        cli(["train", "--dataset", "mnist", "--arch", "mnist-cnn", "--sigma", "0.25", "--epochs", "8", "--lr", "0.05",
             "--schedule", "cosine", "--seed", "0", "--out", checkpoint, "--no-progress"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    per_input: dict[str, list[float]] = {"local": [], "1 worker": [], "2 workers": []}
    overhead: list[float] = []
    for r in range(args.rounds):
        for label, workers in (("local", 0), ("1 worker", 1), ("2 workers", 2)):
            out = args.out / f"round{r}-{workers}.tsv"
            for p in (out, out.with_name(out.name + ".json")):
                p.unlink(missing_ok=True)
            argv = ["certify", "--checkpoint", checkpoint, "--dataset", "mnist", "--split", "test", "--sigma", "0.25",
                    "--n0", "100", "--n", str(args.n), "--alpha", "0.001", "--batch-size", "1100", "--max",
                    str(args.inputs), "--seed", "0", "--out", str(out), "--no-progress"]
            seconds, row_time, count = timed_run(argv, workers)
            per_input[label].append(seconds)
            if workers == 1:
                overhead.append((seconds - row_time) / row_time)
            print(f"round {r} {label}: {seconds * 1000:.1f} ms per input over {count} inputs "
                  f"(rows' own time {row_time * 1000:.1f} ms)", flush=True)
    ray.shutdown()
    base = statistics.median(per_input["local"])
    print("\n| mode | median ms per input | throughput vs local |\n|---|---:|---:|")
    for label, values in per_input.items():
        print(f"| {label} | {statistics.median(values) * 1000:.1f} | {base / statistics.median(values):.2f}x |")
    print(f"\noverhead per input with 1 worker (median of {len(overhead)} rounds): "
          f"{statistics.median(overhead) * 100:.1f}% of the input's certification time")


if __name__ == "__main__":
    main()
