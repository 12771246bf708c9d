"""``smoothcert train``: its options and the command that builds the model, trains it and saves it."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from smoothcert.cli.checks import check_train_options
from smoothcert.cli.common import resolve_device
from smoothcert.cli.options import add_settings_options, dest_of
from smoothcert.data.datasets import DATASETS, load_dataset
from smoothcert.data.files import input_statistics, is_file_dataset
from smoothcert.models.architectures import ARCHITECTURES, build_model, model_for_dataset
from smoothcert.models.pca import add_pca, fit_pca
from smoothcert.noise.families import FAMILIES
from smoothcert.training.loop import OPTIMIZERS, SCHEDULES, train, train_paths
from smoothcert.settings import flag_of, setting_fields
from smoothcert.training.objectives import OBJECTIVES, Objective, make_objective

#: Training defaults per data set (epochs, initial learning rate, schedule), used where an option is not given.
#: mnist: the demo's settings (noisy validation accuracy about 0.96 at sigma 0.25); digits: 30 epochs (about
#: 0.94; 2 epochs stay near chance); the toys and CIFAR-10 keep the generic ones (CIFAR-10: Cohen et al. train
#: 90 epochs, lr 0.1, step decay at 30 and 60: give them).
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist": {"epochs": 8, "lr": 0.05, "schedule": "cosine"},
    "digits": {"epochs": 30, "lr": 0.05, "schedule": "cosine"},
}
GENERIC_DEFAULTS: dict[str, Any] = {"epochs": 10, "lr": 0.01, "schedule": "step"}


def _defaults_help() -> str:
    shown = [f"{name}: {d['epochs']} epochs, lr {d['lr']:g}, {d['schedule']}" for name, d in TRAIN_DEFAULTS.items()]
    g = GENERIC_DEFAULTS
    return "; ".join(shown + [f"other data sets: {g['epochs']} epochs, lr {g['lr']:g}, {g['schedule']}"])


def apply_train_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``--epochs``, ``--lr`` and ``--schedule`` that were not given from the data set's defaults."""
    for key, value in TRAIN_DEFAULTS.get(args.dataset, GENERIC_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args

def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``smoothcert train``."""
    parser.add_argument("--dataset", required=True, metavar="NAME",
                        help=f"a built-in data set ({', '.join(DATASETS)}; cifar10 needs --data-root) or your own "
                             "files: npz:FILE.npz, npy:DIR (arrays x_train, y_train, x_test, y_test, or x, y) or "
                             "folder:DIR (one sub-folder of images per class); see the README's 'Your own data'")
    parser.add_argument("--data-root", default=None, help="directory of data sets read from disk (cifar10)")
    parser.add_argument("--arch", default=None, metavar="NAME",
                        help=f"architecture: {', '.join(sorted(ARCHITECTURES))} (default: mnist-cnn for mnist and "
                             "digits, mlp for the toys, resnet110 for cifar10)")
    parser.add_argument("--objective", default="gaussian", choices=list(OBJECTIVES), help="training objective")
    parser.add_argument("--sigma", type=float, required=True,
                        help="noise level in input units, pixels in [0, 1]; train at the sigma you certify with")
    parser.add_argument("--noise", default="gaussian", choices=list(FAMILIES),
                        help="training noise family at per-coordinate standard deviation --sigma (default gaussian; "
                             "laplace: scale sigma / sqrt(2); uniform: half-width sqrt(3) sigma)")
    parser.add_argument("--epochs", type=int, default=None, help=f"passes over the training split ({_defaults_help()})")
    parser.add_argument("--batch-size", type=int, default=128, help="training inputs per step (default 128)")
    parser.add_argument("--lr", type=float, default=None,
                        help="initial learning rate (default per data set, see --epochs; lower it if the loss "
                             "turns NaN)")
    parser.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help="sgd (with momentum) or adam")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="l2 weight penalty (default 1e-4)")
    parser.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient's l2 norm to this")
    parser.add_argument("--schedule", default=None, choices=SCHEDULES,
                        help="step: x0.1 at the milestones (default 1/3 and 2/3 of the epochs); cosine; constant "
                             "(default per data set, see --epochs)")
    parser.add_argument("--milestones", type=int, nargs="+", default=None,
                        help="epochs at which the step schedule multiplies the learning rate by 0.1")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights, shuffling and noise")
    parser.add_argument("--out", required=True, help="path prefix of the checkpoint (.safetensors/.json), "
                        "log (.train.tsv) and resume state (.state.pt)")
    parser.add_argument("--resume", action="store_true", help="continue the run at --out after its last epoch")
    parser.add_argument("--init", default=None, metavar="CHECKPOINT",
                        help="warm start: begin from this checkpoint's weights (same architecture and input shape, "
                             "e.g. a Gaussian-trained model before CAT-RS) instead of fresh seeded ones; recorded "
                             "in the checkpoint's JSON")
    parser.add_argument("--pca-fraction", type=float, default=None,
                        help="put a PCA projection first in the model, keeping components with variance above "
                             "this fraction of sigma^2 (seed 002: 0.2; ablation 0.1)")
    parser.add_argument("--val-size", type=int, default=1000,
                        help="test inputs (the first ones) on which to report accuracy under noise each epoch "
                             "(monitoring only: the saved model is the last epoch's; 0 = none)")
    parser.add_argument("--device", default="auto",
                        help="auto (an accelerator if there is one, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_settings_options(parser, {name: cls.settings_type for name, cls in OBJECTIVES.items()},
                         title=lambda users: "objective hyperparameters (default: the objective's own)",
                         name_owners=True)
    return parser


def objective_from_args(args: argparse.Namespace) -> Objective:
    """The ``--objective`` with the hyperparameters given on the command line; a hyperparameter the objective
    does not take is an error (:func:`make_objective`)."""
    own = {flag_of(f): f.name for f in setting_fields(OBJECTIVES[args.objective].settings_type)}
    given = {}
    for cls in OBJECTIVES.values():
        for f in setting_fields(cls.settings_type):
            value = getattr(args, dest_of(f), None)
            if value is not None:
                given[own.get(flag_of(f), f.name)] = value
    return make_objective(args.objective, **given)


class _Subset:
    """The first ``size`` items of a data set that supports ``batch``."""

    def __init__(self, dataset, size: int):
        self.dataset, self.size = dataset, min(size, len(dataset))

    def __len__(self) -> int:
        return self.size

    def batch(self, rows):
        return self.dataset.batch(rows)


def _file_model(train_set, arch: str | None):
    """A model for data read from files: its classes and input shape, normalization by the training set's
    per-channel mean and standard deviation; default architecture ``mlp`` for vectors, ``mnist-cnn`` for one
    channel, ``resnet20`` for colour images."""
    shape = train_set.input_shape
    arch = arch or ("mlp" if len(shape) == 1 else "mnist-cnn" if shape[0] == 1 else "resnet20")
    mean, std = input_statistics(train_set.inputs)
    return build_model(arch, num_classes=train_set.num_classes, input_shape=shape, mean=mean, std=std)


def run_train(args: argparse.Namespace) -> int:
    """``smoothcert train``: build the model (optionally with a PCA first layer), train, save; returns 0."""
    check_train_options(apply_train_defaults(args))
    objective = objective_from_args(args)
    device = resolve_device(args.device)
    train_set = load_dataset(args.dataset, "train", args.data_root)
    val_set = _Subset(load_dataset(args.dataset, "test", args.data_root), args.val_size) if args.val_size > 0 else None
    paths = train_paths(args.out)
    # the same seed rebuilds the same initial model (and PCA layer); a resumed run then loads its saved state
    torch.manual_seed(args.seed)
    model = _file_model(train_set, args.arch) if is_file_dataset(args.dataset) else model_for_dataset(args.dataset, args.arch)
    config: dict[str, Any] = {"dataset": train_set.name}
    if args.pca_fraction is not None:
        projection = fit_pca(train_set.inputs, args.sigma, args.pca_fraction)
        model = add_pca(model, projection)
        config["pca"] = {**projection.config(), "fraction": args.pca_fraction}
        print(f"PCA: kept {projection.num_components} of {projection.config()['dim']} directions "
              f"(variance > {args.pca_fraction} * sigma^2)")
    train(model, train_set, objective=objective, sigma=args.sigma, epochs=args.epochs, batch_size=args.batch_size,
          lr=args.lr, seed=args.seed, out=args.out, val_set=val_set, schedule=args.schedule,
          milestones=args.milestones, optimizer=args.optimizer, momentum=args.momentum,
          weight_decay=args.weight_decay, clip_grad_norm=args.clip_grad_norm, resume=args.resume,
          progress=not args.no_progress, device=device, config=config, noise=args.noise, init=args.init)
    print(f"saved {paths['prefix']}.safetensors, log {paths['log']}")
    return 0

