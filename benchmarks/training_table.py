"""Seed 002 table 5.1 on MNIST: how each training objective changes certified accuracy (not run in CI).

For each sigma (default 0.25 and 0.5), with the same architecture (the small MNIST CNN), epochs, optimizer and
schedule for every method, it trains

    Gaussian, Gaussian + PCA, consistency, generalized consistency (the KL term gated on the averaged logits,
    seed 002 eq. 4.3), generalized consistency + PCA, MACER, MACER with the
    gradient threshold 0.99 (seed 002 section 3.2), SmoothAdv, SmoothMix, CAT-RS, and a soft-voting ensemble of
    three Gaussian models (seeds 0, 1, 2),

then certifies the same first ``--inputs`` test digits (default 200 of the 1,000 in smoothcert's MNIST test
split) with Cohen's CERTIFY (n0 = 100, n = 10,000, alpha = 0.001; per-input random streams from
``input_generator(seed, index, "select" / "estimate")``, so every model sees the same noise) and writes a
Markdown table like seed 002 table 5.1: ACR, clean accuracy of the smoothed classifier (certified at radius 0),
certified accuracy at radii 0.25, 0.5, 0.75 and 1.0, training seconds (for the ensemble, its three members) and
training seconds per epoch relative to Gaussian augmentation at the same sigma (from the training logs).

Settings (documented choices for short MNIST runs):
- all: SGD, momentum 0.9, weight decay 1e-4, lr 0.05, cosine schedule, batch 128, ``--epochs`` epochs;
- consistency and generalized consistency: m = 4 noisy copies (seed 002 section 5.1), lbd = 10 at sigma 0.25 and
  20 at sigma 0.5 (Jeong and Shin), eta = 0.5;
- PCA: keep principal directions with variance above sigma^2 / 5 (seed 002 section 4.2);
- MACER: k = 16, lbd = 12, gamma = 8, beta = 16, with the hinge deferred for the first quarter of the epochs and
  gradients clipped to norm 1: on this small CNN without batch norm MACER from scratch otherwise collapses to a
  constant classifier (the instability seed 002 section 3.2 describes);
- MACER (threshold 0.99): the same, with ``--macer-threshold 0.99``;
- SmoothAdv: epsilon = 0.5 (smaller than the CIFAR default 1.0, for MNIST), 10 PGD steps, m = 4, epsilon warm-up
  over the first quarter of the epochs;
- SmoothMix: the public MNIST settings (jh-jeong/smoothmix EXPERIMENTS.MD): m = 4, step 1.0, eta 5.0, T = 2 steps
  at sigma 0.25 and 4 at 0.5, eta warm-up over the first quarter of the epochs (10 of 90 in the public runs);
- CAT-RS: the public defaults (alinlab/smoothing-catrs train_catrs.py): m = 4, epsilon 1.0, 4 steps, lbd 1.0
  (the public MNIST model at sigma 0.25 uses lbd 1.0), in three rows:
  (a) the one-hot label as the KL target, from scratch, batch 128 like the other rows;
  (b) as published: the KL target q is the smoothed prediction of a Gaussian-trained model (here the Gaussian
      row's model at the same sigma; class frequencies over 32 fresh noisy copies per input and step), trained from
      scratch with batches of 128 / m = 32 inputs x m copies (the public code splits each batch of 128 into m
      mini-batches, one SGD step each);
  (c) as (b), warm-started from the Gaussian row's model (``smoothcert train --init``): its training seconds do not
      count the Gaussian row's.

Everything is written under ``--out`` as it goes and a second run resumes: training continues from each model's
last epoch, certification from its last complete row, and the table (``OUT/table.md``) is rewritten after each
method. Run it in the background, e.g.

    nohup .venv/bin/python benchmarks/training_table.py --out runs/training-table > runs/training-table.log 2>&1 &

The table's training seconds are wall time and grow with whatever else the machine runs; ``--timing`` measures
the cost of each objective per epoch in one run of interleaved rounds (``OUT/epoch-seconds.md``).

On a shared 2-core CPU it takes several hours (certification dominates: about 11 model-evaluations of
200 x 10,100 noisy digits per sigma); on a GPU, minutes. ``--inputs``, ``--n``, ``--epochs`` and ``--sigmas`` make
a smaller run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.engine.smooth import certify
from smoothcert.engine.sampling import input_generator
from smoothcert.models.checkpoint import load_checkpoint
from smoothcert.cli.common import resolve_device
from smoothcert.data.datasets import SmoothingDataset, load_dataset
from smoothcert.models.ensemble import Ensemble
from smoothcert.evaluation.tables import average_certified_radius, certified_accuracy, load_results
from smoothcert.models.architectures import model_for_dataset
from smoothcert.training.objectives import make_objective
from smoothcert.models.pca import add_pca, fit_pca
from smoothcert.cli.runner import CERTIFY_COLUMNS, ResultsFile, run_dataset
from smoothcert.training.loop import train

RADII = (0.25, 0.5, 0.75, 1.0)


@dataclass
class Method:
    label: str
    slug: str
    objective: str
    hyper: dict = field(default_factory=dict)
    pca: float | None = None
    seeds: tuple[int, ...] = (0,)
    clip: float | None = None
    batch_size: int = 128
    init: str | None = None        # slug of the model (same sigma, seed 0) to warm-start from
    teacher: str | None = None     # slug of the model (same sigma, seed 0) whose smoothed prediction is CAT-RS's q


def methods(sigma: float, epochs: int) -> list[Method]:
    quarter = max(1, epochs // 4)
    lbd = 10.0 if sigma <= 0.25 else 20.0
    cons = {"m": 4, "lbd": lbd, "eta": 0.5}
    catrs = {"m": 4, "epsilon": 1.0, "steps": 4, "lbd": 1.0}
    return [
        Method("Gaussian", "gaussian", "gaussian"),
        Method("Gaussian + PCA", "gaussian-pca", "gaussian", pca=0.2),
        Method("Consistency", "consistency", "consistency", cons),
        Method("Generalized consistency", "gen-consistency", "generalized-consistency", cons),
        Method("Generalized consistency + PCA", "gen-consistency-pca", "generalized-consistency", cons, pca=0.2),
        Method("MACER", "macer", "macer", {"k": 16, "lbd": 12.0, "gamma": 8.0, "beta": 16.0, "warmup": quarter},
               clip=1.0),
        Method("MACER (threshold 0.99)", "macer-threshold", "macer",
               {"k": 16, "lbd": 12.0, "gamma": 8.0, "beta": 16.0, "warmup": quarter, "threshold": 0.99}, clip=1.0),
        Method("SmoothAdv", "smoothadv", "smoothadv", {"epsilon": 0.5, "steps": 10, "m": 4, "warmup": quarter}),
        Method("SmoothMix", "smoothmix", "smoothmix",
               {"m": 4, "steps": 2 if sigma <= 0.25 else 4, "step_size": 1.0, "eta": 5.0, "warmup": quarter}),
        Method("CAT-RS (teacher q, from scratch, batch 32: published)", "cat-rs-teacher", "cat-rs",
               {**catrs, "teacher_samples": 32}, teacher="gaussian", batch_size=32),
        Method("CAT-RS (teacher q, warm start from Gaussian, batch 32)", "cat-rs-warm", "cat-rs",
               {**catrs, "teacher_samples": 32}, teacher="gaussian", init="gaussian", batch_size=32),
        Method("CAT-RS (one-hot q, from scratch)", "cat-rs", "cat-rs", catrs),
        Method("Ensemble (m=3) of Gaussian", "gaussian", "gaussian", seeds=(0, 1, 2)),
    ]


def member_model(method: Method, seed: int, sigma: float, train_set) -> tuple[torch.nn.Module, dict]:
    """A fresh seeded MNIST CNN for ``method`` (with its PCA first layer when it has one) and its config."""
    torch.manual_seed(seed)
    model = model_for_dataset("mnist", "mnist-cnn")
    config = {"dataset": "mnist"}
    if method.pca is not None:
        projection = fit_pca(train_set.inputs, sigma, method.pca)
        model = add_pca(model, projection)
        config["pca"] = {**projection.config(), "fraction": method.pca}
    return model, config


def stem_of(root: Path, sigma: float, slug: str, seed: int = 0) -> Path:
    return root / f"sigma{sigma:g}" / f"{slug}-seed{seed}"


def training_settings(method: Method, root: Path | None = None, sigma: float | None = None) -> dict:
    """The settings every method shares (SGD, lr 0.05, cosine), with its objective, batch size, clipping and, under
    ``root`` at ``sigma``, its teacher and initial weights."""
    hyper = dict(method.hyper)
    if method.teacher is not None:
        hyper["teacher"] = str(stem_of(root, sigma, method.teacher))
    init = str(stem_of(root, sigma, method.init)) if method.init is not None else None
    return dict(objective=make_objective(method.objective, **hyper), batch_size=method.batch_size, lr=0.05,
                schedule="cosine", clip_grad_norm=method.clip, init=init)


def epoch_seconds(args, train_set, device) -> str:
    """Seconds per training epoch of each method (one member; the ensemble costs three Gaussian members), the
    median over ``--timing-rounds`` rounds in which the methods take turns, and the ratio to Gaussian
    augmentation: the training cost measured in one run, on whatever else the machine is doing alike. MACER's
    first epoch defers its hinge (forward cost unchanged); SmoothAdv's attack runs every step."""
    sigma = args.sigmas[0]
    members = [m for m in methods(sigma, args.epochs) if len(m.seeds) == 1 and m.teacher is None and m.init is None]
    seconds: dict[str, list[float]] = {m.label: [] for m in members}
    for _ in range(args.timing_rounds):
        for method in members:
            model, _ = member_model(method, 0, sigma, train_set)
            began = time.perf_counter()
            train(model, train_set, sigma=sigma, epochs=1, progress=False, device=device, **training_settings(method))
            seconds[method.label].append(time.perf_counter() - began)
    base = statistics.median(seconds["Gaussian"])
    lines = [f"MNIST CNN, sigma {sigma:g}, one epoch of {len(train_set):,} digits, batch 128, device {device}, "
             f"{torch.get_num_threads()} threads; median of {args.timing_rounds} interleaved rounds.", "",
             "| model | s / epoch | x Gaussian |", "|---|---:|---:|"]
    for label, values in seconds.items():
        lines.append(f"| {label} | {statistics.median(values):.2f} | {statistics.median(values) / base:.1f} |")
    lines.append(f"| Ensemble (m=3) of Gaussian | {3 * base:.2f} | 3.0 |")
    return "\n".join(lines) + "\n"


def train_member(method: Method, seed: int, sigma: float, args, train_set, val_set, device
                 ) -> tuple[Path, float, float]:
    """Train (or resume, or skip when done) one model; return its checkpoint stem, training seconds and the median
    seconds per epoch."""
    stem = stem_of(args.out, sigma, method.slug, seed)
    model, config = member_model(method, seed, sigma, train_set)
    history = train(model, train_set, sigma=sigma, epochs=args.epochs, seed=seed, out=stem, val_set=val_set,
                    resume=True, progress=args.progress, device=device, config=config,
                    **training_settings(method, args.out, sigma))
    last = history[-1]
    print(f"  {stem.name}: {len(history)} epochs, loss {last['loss']:.3f}, val noisy acc {last['val_noisy_acc']:.3f}",
          flush=True)
    return stem, sum(row["seconds"] for row in history), statistics.median(row["seconds"] for row in history)


@dataclass(frozen=True)
class CertifiedRow:
    """One input's CERTIFY result as the runner's record (:func:`smoothcert.methods.records.record_row`)."""

    fields: dict

    def values(self) -> dict:
        return dict(self.fields)


def certify_model(model, path: Path, sigma: float, args, test_set, device, config: dict) -> Path:
    noise = IsotropicGaussian(sigma)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32

    def process(x, labels, indices):
        gens = [(input_generator(args.seed, i, "select", device), input_generator(args.seed, i, "estimate", device))
                for i in indices]
        certs = certify(model, x.to(device), noise, 10, args.n0, args.n, args.alpha, batch_size=args.batch,
                        generators=gens, dtype=dtype, seed=args.seed)
        return [CertifiedRow({"predict": c.prediction, "radius": round(c.radius, 6), "p_lower": round(c.p_lower, 8)})
                for c in certs]

    results = ResultsFile(path, CERTIFY_COLUMNS + ("p_lower",),
                          {**config, "sigma": sigma, "n0": args.n0, "n": args.n, "alpha": args.alpha,
                           "dtype": args.dtype, "seed": args.seed, "inputs": args.inputs})
    return run_dataset(results, lambda idx: test_set.batch(idx), list(range(args.inputs)), process,
                       inputs_per_batch=args.inputs_per_batch, progress=args.progress)


def head(dataset: SmoothingDataset, size: int | None) -> SmoothingDataset:
    """The first ``size`` items of ``dataset`` (all of it for ``None``)."""
    if size is None or size >= len(dataset):
        return dataset
    return SmoothingDataset(dataset.inputs[:size], dataset.labels[:size], num_classes=dataset.num_classes,
                            name=dataset.name, split=dataset.split)


def table(rows: list[list[str]], args) -> str:
    header = ["sigma", "model", "ACR", "clean acc"] + [f"{r:g}" for r in RADII] + ["train s", "s/epoch x Gaussian"]
    lines = [f"MNIST (smoothcert split), first {args.inputs} test digits, CERTIFY n0 = {args.n0}, n = {args.n:,}, "
             f"alpha = {args.alpha}, {args.epochs} epochs on {args.train_digits:,} training digits, dtype "
             f"{args.dtype}; accuracies in %.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/training-table"))
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--inputs", type=int, default=200, help="first test digits to certify")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch", type=int, default=4000, help="noisy samples per forward pass")
    parser.add_argument("--inputs-per-batch", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="certification seed")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="certification dtype (auto: bfloat16 on an accelerator, float32 on the CPU)")
    parser.add_argument("--train-size", type=int, default=None, help="train on the first digits only (default all)")
    parser.add_argument("--val-size", type=int, default=None,
                        help="noisy validation digits per epoch, for the logs (default all test digits)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="only these method slugs (the ensemble's: gaussian-ensemble)")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    parser.add_argument("--timing", action="store_true",
                        help="only time one training epoch of each method (interleaved rounds) and write "
                             "OUT/epoch-seconds.md; trains nothing to keep, certifies nothing")
    parser.add_argument("--timing-rounds", type=int, default=3, help="rounds of --timing (default 3)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.dtype == "auto":
        args.dtype = "float32" if device.type == "cpu" else "bfloat16"
    args.out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = head(load_dataset("mnist", "train"), args.train_size), load_dataset("mnist", "test")
    args.train_digits = len(train_set)
    val_set = head(test_set, args.val_size)  # accuracy under noise per epoch, for the logs only: no model selection
    if args.timing:
        text = epoch_seconds(args, train_set, device)
        (args.out / "epoch-seconds.md").write_text(text)
        print(text, flush=True)
        return
    rows: list[list[str]] = []
    began = time.perf_counter()
    for sigma in args.sigmas:
        gaussian_epoch = None
        for method in methods(sigma, args.epochs):
            key = method.slug + ("-ensemble" if len(method.seeds) > 1 else "")
            if args.only and key not in args.only:
                continue
            print(f"sigma {sigma:g}: {method.label}", flush=True)
            trained = [train_member(method, s, sigma, args, train_set, val_set, device) for s in method.seeds]
            models = [load_checkpoint(stem, device=device)[0] for stem, _, _ in trained]
            per_epoch = sum(e for _, _, e in trained)
            if method.slug == "gaussian" and len(trained) == 1:
                gaussian_epoch = per_epoch
            model = models[0] if len(models) == 1 else Ensemble(models).eval()
            name = method.slug + ("-ensemble" if len(models) > 1 else "")
            path = certify_model(model, args.out / f"sigma{sigma:g}" / f"{name}.certify.tsv", sigma, args,
                                 test_set, device, {"models": [str(stem) for stem, _, _ in trained]})
            res = load_results(path)
            acc = certified_accuracy(res.radius, res.correct, (0.0, *RADII))
            rows.append([f"{sigma:g}", method.label, f"{average_certified_radius(res.radius, res.correct):.3f}"]
                        + [f"{100 * a:.1f}" for a in acc] + [f"{sum(s for _, s, _ in trained):.0f}"]
                        + [f"{per_epoch / gaussian_epoch:.1f}" if gaussian_epoch else "-"])
            text = table(rows, args)
            (args.out / "table.md").write_text(text)
            print(text, flush=True)
    print(f"done in {time.perf_counter() - began:.0f} s; table in {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
