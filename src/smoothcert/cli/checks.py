"""Checks of a command's options before any work or file: every bad value is one ValueError saying what is allowed.

A command first checks every setting it can check from the options alone (:func:`check_run_options`,
:func:`check_demo_options`), then loads the model and the data and checks that they fit each other
(:func:`check_input_shape`), and only then opens (or resumes) its results file. So a rejected run leaves nothing
behind, and a bad value is reported as such even when a results file of another configuration exists.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from smoothcert.validation import check_alpha, check_count, check_number, check_positive, check_sample_sizes

__all__ = ["check_run_options", "check_demo_options", "check_plot_options", "check_train_options", "check_input_shape", "check_output_path"]

#: Seeds and dataset indices are words of the per-input stream key (:func:`smoothcert.engine.sampling.input_generator`).
_SEED_LIMIT = 2**32


def check_output_path(name: str, path: str | Path) -> Path:
    """``path`` is where a file will go: not an existing folder, and its parent is not a file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {path} is a folder; give the path of a file in it (e.g. {path / 'results.tsv'})")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{name} {path}: {parent} is a file, not a folder")
    return path


def check_seed(seed: int) -> int:
    if not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be a whole number in [0, 2**32), got {seed}")
    return seed


def check_run_options(args: argparse.Namespace, *, certify: bool) -> None:
    """The sampling options of ``certify`` / ``predict``: sample sizes (``n0 <= n``), alpha, batch sizes, seed,
    selection, sigma when given, and the output path."""
    if certify:
        check_sample_sizes(args.n0, args.n)
    else:
        check_count("n", args.n)
    check_alpha(args.alpha)
    check_count("batch-size", args.batch_size)
    check_count("inputs-per-batch", args.inputs_per_batch)
    check_seed(args.seed)
    check_count("skip", args.skip)
    if args.max is not None:
        check_count("max", args.max)
    if args.sigma is not None:
        check_positive("sigma (--sigma)", args.sigma)
    check_output_path("--out", args.out)


def check_demo_options(args: argparse.Namespace, n0: int) -> None:
    """The demo's options, before it trains: digits to certify, estimation samples (at least the demo's ``n0``)."""
    check_count("inputs", args.inputs)
    check_count("n", args.n)
    if args.n < n0:
        raise ValueError(f"n must be at least the demo's n0 = {n0} selection samples, got n={args.n}")
    check_output_path("--out folder's parent", Path(args.out) / "x")


def check_input_shape(config: dict[str, Any], input_shape: tuple[int, ...], dataset: str) -> None:
    """The checkpoint's recorded input shape must be the data set's (an MNIST model cannot read 8x8 digits)."""
    expected = config.get("input_shape")
    if expected is not None and tuple(int(s) for s in expected) != tuple(input_shape):
        trained = f" (it was trained on {config['dataset']})" if config.get("dataset") else ""
        raise ValueError(f"the checkpoint takes inputs of shape {tuple(expected)}{trained}, but the data set "
                         f"{dataset} has inputs of shape {tuple(input_shape)}: give a checkpoint trained on "
                         f"{dataset}, or --dataset {config.get('dataset') or 'NAME'}")


def check_plot_options(args: argparse.Namespace) -> None:
    """``plot-regions``: sample sizes, alpha, seed, sigma when given, the points and the output path."""
    check_sample_sizes(args.n0, args.n)
    check_alpha(args.alpha)
    check_seed(args.seed)
    if args.sigma is not None:
        check_positive("sigma (--sigma)", args.sigma)
    if any(p < 0 for p in args.points):
        raise ValueError(f"--points are dataset indices (>= 0), got {args.points}")
    check_output_path("--out", args.out)


def check_train_options(args: argparse.Namespace) -> None:
    """``train``'s numbers (after the data set's defaults are filled in), before it loads data or builds a model."""

    check_count("epochs", args.epochs)
    check_count("batch-size", args.batch_size)
    check_positive("lr (learning rate)", args.lr)
    check_number("momentum", args.momentum, 0.0, 1.0, high_open=True)
    check_number("weight-decay", args.weight_decay, 0.0)
    check_count("val-size", args.val_size, minimum=0)
    check_positive("sigma (--sigma)", args.sigma)
    if args.pca_fraction is not None:
        check_positive("pca-fraction", args.pca_fraction)
    if args.clip_grad_norm is not None:
        check_positive("clip-grad-norm", args.clip_grad_norm)
    check_seed(args.seed)
    check_output_path("--out", args.out)
