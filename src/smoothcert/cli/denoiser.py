"""``smoothcert train-denoiser``: train a DnCNN denoiser in front of a frozen classifier (denoised smoothing).

The denoiser is saved in the checkpoint format of :mod:`smoothcert.models.checkpoint` with ``role: denoiser``,
its ``sigma`` and the sha256 of the classifier (and surrogate) it was trained against; ``smoothcert certify
--denoiser D --checkpoint C`` then certifies ``C o D``.
"""

from __future__ import annotations

import argparse

import torch

from smoothcert.cli.common import file_digest, load_base_classifier, resolve_device, weights_path
from smoothcert.data.datasets import load_dataset
from smoothcert.models.architectures import build_model
from smoothcert.training.denoising import DENOISER_OBJECTIVES, train_denoiser

__all__ = ["add_denoiser_arguments", "run_train_denoiser"]


def add_denoiser_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``smoothcert train-denoiser``."""
    parser.add_argument("--classifier", required=True, help="checkpoint of the frozen classifier to denoise for")
    parser.add_argument("--objective", required=True, choices=DENOISER_OBJECTIVES,
                        help="mse: to the clean image; stability: cross-entropy of C(D(x + delta)) against "
                             "C's prediction on x; stab-mse: their sum")
    parser.add_argument("--sigma", type=float, required=True,
                        help="noise level in input units, pixels in [0, 1]; certify with the same sigma")
    parser.add_argument("--surrogate", default=None,
                        help="query access: gradients flow through this surrogate classifier's checkpoint; the "
                             "classifier is only queried for its predictions on clean inputs")
    parser.add_argument("--dataset", default=None, help="training data set (default: the classifier's)")
    parser.add_argument("--data-root", default=None, help="directory of data sets read from disk (cifar10)")
    parser.add_argument("--train-size", type=int, default=None, help="train on the first this many inputs")
    parser.add_argument("--depth", type=int, default=5, help="DnCNN convolutions (default 5; Salman et al.: 17)")
    parser.add_argument("--width", type=int, default=32, help="DnCNN channels (default 32; Salman et al.: 64)")
    parser.add_argument("--epochs", type=int, default=5, help="default 5")
    parser.add_argument("--batch-size", type=int, default=64, help="default 64")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights, shuffling and noise")
    parser.add_argument("--out", required=True,
                        help="path prefix of the denoiser checkpoint (.safetensors/.json), log and resume state")
    parser.add_argument("--resume", action="store_true", help="continue the run at --out after its last epoch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


class _First:
    def __init__(self, dataset, size):
        self.dataset, self.size = dataset, len(dataset) if size is None else min(size, len(dataset))

    def __len__(self):
        return self.size

    def batch(self, rows):
        return self.dataset.batch(rows)


def run_train_denoiser(args: argparse.Namespace) -> int:
    """Check the options, load the frozen classifier(s), build the DnCNN (seeded), train and save; returns 0."""
    for name, low in (("depth", 2), ("width", 1), ("epochs", 1), ("batch_size", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {getattr(args, name)}")
    if args.train_size is not None and args.train_size < 1:
        raise ValueError(f"--train-size must be an integer >= 1, got {args.train_size}")
    if not args.sigma > 0:
        raise ValueError(f"--sigma must be > 0 (input units, pixels in [0, 1]), got {args.sigma}")
    device = resolve_device(args.device)
    classifier, config, _ = load_base_classifier([args.classifier], device)
    surrogate = None
    if args.surrogate is not None:
        surrogate, sconfig, _ = load_base_classifier([args.surrogate], device)
        if list(sconfig.get("input_shape", [])) != list(config.get("input_shape", [])):
            raise ValueError(f"the surrogate takes inputs of shape {sconfig.get('input_shape')}, the classifier "
                             f"{config.get('input_shape')}: they must match")
    dataset_name = args.dataset or config.get("dataset")
    train_set = _First(load_dataset(dataset_name, "train", args.data_root), args.train_size)
    shape = [int(s) for s in config["input_shape"]]
    torch.manual_seed(args.seed)
    denoiser = build_model("dncnn", input_shape=shape, depth=args.depth, width=args.width)
    record = {"dataset": dataset_name,
              "classifier": {"path": args.classifier, "sha256": file_digest(weights_path(args.classifier))}}
    if args.surrogate is not None:
        record["surrogate"] = {"path": args.surrogate, "sha256": file_digest(weights_path(args.surrogate))}
    train_denoiser(denoiser, classifier, train_set, objective=args.objective, sigma=args.sigma, epochs=args.epochs,
                   out=args.out, batch_size=args.batch_size, lr=args.lr, seed=args.seed, surrogate=surrogate,
                   resume=args.resume, progress=not args.no_progress, device=device, config=record)
    print(f"saved {args.out}.safetensors (denoiser for sigma {args.sigma}), log {args.out}.train.tsv")
    return 0
