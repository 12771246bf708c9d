"""Fixed, DDS, ANCER, RANCER and RDDRS on the same MNIST test digits and model (like seed 000 tables 5.3-5.5).

Runs the real command line (``smoothcert certify --method ...``, memory on for the data-dependent methods) on the
first ``--inputs`` test digits with one noise-trained MNIST CNN, then prints ``smoothcert report --proxy
--baseline <fixed>``: certified accuracy at l2 and proxy radii, ACR, proxy ACR, ARI against fixed smoothing and
seconds per input. Every run is resumable: run the script again to continue. Not run in CI.

    python benchmarks/compare_methods.py --checkpoint demo-output/mnist-cnn-gaussian --out runs/compare
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from smoothcert.cli.main import main as cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="noise-trained MNIST model (default: train the demo's)")
    ap.add_argument("--out", type=Path, default=Path("runs/compare"))
    ap.add_argument("--methods", nargs="+", default=["fixed", "dds", "ancer", "rancer", "rddrs"])
    ap.add_argument("--inputs", type=int, default=100)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--inputs-per-batch", type=int, default=25, help="inputs optimized and certified together")
    ap.add_argument("--batch-size", type=int, default=2000)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="further certify options for the data-dependent methods (e.g. --dds-steps 300)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = str(args.out / "mnist-cnn-gaussian")
        if not Path(checkpoint + ".safetensors").exists():
            cli(["train", "--dataset", "mnist", "--arch", "mnist-cnn", "--sigma", str(args.sigma), "--epochs", "8",
                 "--lr", "0.05", "--schedule", "cosine", "--seed", "0", "--out", checkpoint, "--no-progress"])
    files = []
    for method in args.methods:
        out = args.out / f"{method}.tsv"
        t0 = time.perf_counter()
        code = cli(["certify", "--checkpoint", checkpoint, "--dataset", "mnist", "--split", "test", "--method", method,
                    "--sigma", str(args.sigma), "--n0", str(args.n0), "--n", str(args.n), "--alpha", str(args.alpha),
                    "--batch-size", str(args.batch_size), "--inputs-per-batch", str(args.inputs_per_batch),
                    "--max", str(args.inputs), "--seed", "0", "--out", str(out), "--no-progress"]
                   + ([] if method == "fixed" else args.extra))
        if code:
            raise SystemExit(code)
        print(f"{method}: {time.perf_counter() - t0:.0f} s in this call", flush=True)
        files.append(str(out))
    report = args.out / "table.md"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        cli(["report", *files, "--labels", *args.methods, "--proxy", "--radii", "0", "0.25", "0.5", "0.75", "1.0",
             "1.5", "2.0", "--plot", str(args.out / "certified-accuracy.png"), "--baseline", files[0]])
    report.write_text(buffer.getvalue())
    print(buffer.getvalue())


if __name__ == "__main__":
    main()
