"""RANCER's scale variants beside ANCER on the same MNIST test digits and model (seed 000 sections 4.3.1-4.3.3).

Runs the real command line (``smoothcert certify``, memory on) on the first ``--inputs`` test digits with one
noise-trained MNIST CNN for

    ANCER, RANCER with the isotropic DDS start (4.3.1), RANCER with the mapped Hessian eigenvalues as the start
    of the optimization (``--rancer-scales eigen-init``, 4.3.2) and as the final scales (``eigen-final``, 4.3.3;
    with the ``curvature`` map and, as a further row, the ``direct`` map),

then writes ``OUT/table.md`` with ``smoothcert report --proxy``: certified accuracy at l2 and proxy radii, ACR,
proxy ACR and seconds per input (like the thesis' tables 5.3-5.5). Every run is resumable: run the script again to
continue. The run's ``certify`` settings go to every method alike. Not run in CI.

    python benchmarks/rancer_variants.py --checkpoint runs/demo/mnist-cnn-gaussian --out runs/rancer-variants \\
        --extra --dds-steps 100 --ancer-steps 50 --opt-samples 64
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path

from smoothcert.cli.main import main as cli

#: (label, file stem, method, its own options)
VARIANTS = (
    ("ANCER", "ancer", "ancer", []),
    ("RANCER isotropic", "rancer", "rancer", []),
    ("RANCER eigen-final", "rancer-eigen-final", "rancer", ["--rancer-scales", "eigen-final"]),
    ("RANCER eigen-final direct", "rancer-eigen-final-direct", "rancer",
     ["--rancer-scales", "eigen-final", "--rancer-eigen-map", "direct"]),
    ("RANCER eigen-init", "rancer-eigen-init", "rancer", ["--rancer-scales", "eigen-init"]),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="noise-trained MNIST model (path prefix)")
    ap.add_argument("--out", type=Path, default=Path("runs/rancer-variants"))
    ap.add_argument("--only", nargs="+", default=None, help="file stems to run (default: all)")
    ap.add_argument("--inputs", type=int, default=100)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--inputs-per-batch", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=2000)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further certify options for every method")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    files, labels = [], []
    for label, stem, method, own in VARIANTS:
        out = args.out / f"{stem}.tsv"
        if args.only is None or stem in args.only:
            t0 = time.perf_counter()
            code = cli(["certify", "--checkpoint", args.checkpoint, "--dataset", "mnist", "--split", "test",
                        "--method", method, "--sigma", str(args.sigma), "--n0", str(args.n0), "--n", str(args.n),
                        "--alpha", str(args.alpha), "--batch-size", str(args.batch_size),
                        "--inputs-per-batch", str(args.inputs_per_batch), "--max", str(args.inputs), "--seed", "0",
                        "--out", str(out), "--no-progress", *own, *args.extra])
            if code:
                raise SystemExit(code)
            print(f"{label}: {time.perf_counter() - t0:.0f} s in this call", flush=True)
        if out.exists():
            files.append(str(out))
            labels.append(label.replace(" ", "-"))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        cli(["report", *files, "--labels", *labels, "--proxy", "--radii", "0", "0.25", "0.5", "0.75", "1.0"])
    (args.out / "table.md").write_text(buffer.getvalue())
    print(buffer.getvalue())


if __name__ == "__main__":
    main()
