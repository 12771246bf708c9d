"""One training loop for every objective of :mod:`smoothcert.objectives`, resumable and reproducible.

``train`` runs SGD with momentum (or Adam) under a step or cosine learning-rate schedule. Each epoch it
shuffles the training set, minimizes the objective's loss on noisy copies of the inputs (noise added in input
space, pixels in [0, 1], at the certification ``sigma``), measures the base classifier's accuracy under noise
on a validation set, and writes as it goes:

- ``{out}.safetensors`` + ``{out}.json``: the model and its configuration (:mod:`smoothcert.checkpoint`);
- ``{out}.train.tsv``: one row per epoch (epoch, loss, train_acc, val_noisy_acc, lr, seconds);
- ``{out}.state.pt``: what resuming needs (model, optimizer state, epoch, history), loaded with
  ``weights_only=True``.

Randomness is a pure function of ``(seed, epoch)`` (streams of :func:`smoothcert.sampling.input_generator`
with the epoch as index): the shuffle, the training noise, the validation noise and
torch's global generator (dropout) are reseeded from them at each epoch (inside ``fork_rng``, so the caller's
global state is untouched). The learning rate is a pure function of the epoch. So the same seed gives the
same weights, and a run resumed after epoch ``e`` continues exactly as if it had never stopped.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .objectives import OBJECTIVES, Objective, make_objective
from .sampling import input_generator
from .validation import check_count, check_positive

__all__ = ["train", "noisy_accuracy", "learning_rate", "add_train_arguments", "run_train", "LOG_COLUMNS",
           "SCHEDULES", "OPTIMIZERS"]

LOG_COLUMNS = ("epoch", "loss", "train_acc", "val_noisy_acc", "lr", "seconds")
SCHEDULES = ("step", "cosine", "constant")
OPTIMIZERS = ("sgd", "adam")


def learning_rate(schedule: str, lr: float, epoch: int, epochs: int,
                  milestones: Sequence[int] | None = None, gamma: float = 0.1) -> float:
    """The learning rate of (0-based) ``epoch``.

    ``step``: ``lr * gamma^(number of milestones <= epoch)``, milestones by default at 1/3 and 2/3 of the
    epochs (seed 002 section 5.1: 90 epochs, decay at 30 and 60). ``cosine``: ``lr/2 (1 + cos(pi epoch /
    epochs))``. ``constant``: ``lr``.
    """
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        marks = milestones if milestones is not None else (epochs // 3, 2 * epochs // 3)
        return lr * gamma ** sum(1 for m in marks if 0 < m <= epoch)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


def _batches(dataset, batch_size: int, generator: torch.Generator | None,
             device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(x, y)`` on ``device``: shuffled by ``generator`` (``None``: in order).

    A data set with ``batch(indices)`` (smoothcert's) or ``inputs``/``labels`` tensors is indexed directly;
    any other map-style data set whose items start with ``(x, y)`` is read item by item.
    """
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        if hasattr(dataset, "batch"):
            x, y = dataset.batch(rows)
        elif hasattr(dataset, "inputs") and hasattr(dataset, "labels"):
            x, y = dataset.inputs[rows], torch.as_tensor(dataset.labels)[rows]
        else:
            items = [dataset[int(i)] for i in rows]
            x = torch.stack([torch.as_tensor(item[0]) for item in items])
            y = torch.as_tensor([int(item[1]) for item in items])
        yield x.to(device=device, dtype=torch.float32), y.to(device=device, dtype=torch.int64)


def noisy_accuracy(model: nn.Module, dataset, sigma: float, *, batch_size: int = 512,
                   generator: torch.Generator | None = None, device: torch.device | str | None = None) -> float:
    """Accuracy of the base classifier on ``x + N(0, sigma^2 I)``, one draw per input (model in eval mode)."""
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        with torch.inference_mode():
            for x, y in _batches(dataset, batch_size, None, device):
                noisy = x + sigma * torch.randn(x.shape, generator=generator, device=device)
                correct += int((model(noisy).argmax(1) == y).sum())
                total += len(y)
    finally:
        model.train(was_training)
    return correct / max(total, 1)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _fork_rng(device: torch.device):
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_log(path: Path, history: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(LOG_COLUMNS)
            for row in history:
                w.writerow(["" if row[c] is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                            for c in LOG_COLUMNS])
    _write_atomic(path, write)


def _paths(out: str | os.PathLike) -> dict[str, Path]:
    prefix = Path(out)
    if prefix.suffix in (".safetensors", ".json"):
        prefix = prefix.with_suffix("")
    return {"prefix": prefix, "log": prefix.with_name(prefix.name + ".train.tsv"),
            "state": prefix.with_name(prefix.name + ".state.pt")}


#: training settings that must agree between a run and its resumption
_RESUME_KEYS = ("objective", "sigma", "seed", "batch_size", "lr", "schedule", "optimizer", "milestones",
                "momentum", "weight_decay", "clip_grad_norm")


def train(
    model: nn.Module,
    train_set,
    *,
    objective: str | Objective = "gaussian",
    sigma: float,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.01,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    val_set=None,
    schedule: str = "step",
    milestones: Sequence[int] | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    clip_grad_norm: float | None = None,
    resume: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
    config: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place under ``objective`` at noise level ``sigma``; return the per-epoch history.

    ``objective`` is a name from :data:`smoothcert.objectives.OBJECTIVES` (default hyperparameters) or an
    :class:`~smoothcert.objectives.Objective`. ``sigma`` is in input units (pixels in [0, 1]); train at the
    ``sigma`` you will certify with. ``out`` is a path prefix for the checkpoint, log and resume state
    (``None``: write nothing). With ``resume=True`` and a state file at ``out``, training continues after the
    last completed epoch (model, optimizer, history; randomness and learning rate are functions of the
    epoch); the settings that shape the run must match the saved ones (``epochs`` may grow: the cosine and
    default step schedules then follow the new total). ``config`` adds entries to the checkpoint's JSON
    (e.g. ``dataset``) next to the training settings; the model must come from
    :func:`smoothcert.models.build_model` (which records how to rebuild it) or ``config`` must name its
    ``arch`` and ``arch_kwargs``. ``clip_grad_norm`` rescales the gradient to at most that l2 norm before
    each step (``None``: never). ``device`` defaults to the model's. Each history row has the keys of
    :data:`LOG_COLUMNS`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sigma = check_positive("sigma (noise level, in input units where pixels lie in [0, 1])", sigma)
    check_count("epochs", epochs)
    check_count("batch_size", batch_size)
    check_positive("lr", lr)
    if clip_grad_norm is not None:
        check_positive("clip_grad_norm", clip_grad_norm)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if len(train_set) == 0:
        raise ValueError("the training set is empty")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    learning_rate(schedule, lr, 0, epochs, milestones)   # validates the schedule name
    if resume and out is None:
        raise ValueError("resume=True needs out, the path prefix of the run to resume")
    objective = make_objective(objective)
    device = torch.device(device) if device is not None else _model_device(model)
    model.to(device)

    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    settings = {"objective": objective.name, "objective_config": objective.config(), "sigma": sigma,
                "seed": seed, "batch_size": batch_size, "lr": lr, "schedule": schedule,
                "milestones": list(milestones) if milestones is not None else None, "optimizer": optimizer,
                "momentum": momentum, "weight_decay": weight_decay, "clip_grad_norm": clip_grad_norm,
                "epochs": epochs}
    paths = _paths(out) if out is not None else None
    history: list[dict[str, Any]] = []
    start = 0
    if resume and paths["state"].is_file():
        state = torch.load(paths["state"], map_location=device, weights_only=True)
        saved = state["settings"]
        differ = [k for k in _RESUME_KEYS if saved.get(k) != settings.get(k)]
        if saved.get("objective_config") != settings["objective_config"]:
            differ.append("objective hyperparameters")
        if differ:
            raise ValueError(f"cannot resume {paths['prefix']}: these settings differ from the saved run: "
                             + ", ".join(f"{k} (saved {saved.get(k)!r}, now {settings.get(k)!r})" for k in differ))
        start = int(state["epoch"])
        if start > epochs:
            raise ValueError(f"cannot resume {paths['prefix']} to {epochs} epochs: it has already done {start}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history = list(state["history"])
    if paths is not None:
        paths["prefix"].parent.mkdir(parents=True, exist_ok=True)

    for epoch in range(start, epochs):
        began = time.perf_counter()
        rate = learning_rate(schedule, lr, epoch, epochs, milestones)
        for group in opt.param_groups:
            group["lr"] = rate
        objective.start_epoch(epoch)
        shuffle = input_generator(seed, epoch, "shuffle")
        noise = input_generator(seed, epoch, "train-noise", device)
        total_loss = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        with _fork_rng(device):
            torch.manual_seed(input_generator(seed, epoch, "global").initial_seed())
            model.train()
            steps = math.ceil(len(train_set) / batch_size)
            bar = tqdm(_batches(train_set, batch_size, shuffle, device), total=steps, disable=not progress,
                       desc=f"epoch {epoch + 1}/{epochs}", leave=False)
            for step, (x, y) in enumerate(bar):
                loss, scores = objective.loss(model, x, y, sigma, generator=noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
                opt.step()
                total_loss += loss.detach() * len(y)
                correct += (scores.argmax(1) == y).sum()
                seen += len(y)
                if step % 20 == 0 or step == steps - 1:   # one device sync every 20 steps
                    mean_loss = float(total_loss) / seen
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(f"the {objective.name} loss became {mean_loss} in epoch "
                                                 f"{epoch + 1}; lower the learning rate")
                    bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{int(correct) / seen:.3f}")
            bar.close()
        val = None
        if val_set is not None:
            val = noisy_accuracy(model, val_set, sigma, batch_size=max(batch_size, 256), device=device,
                                 generator=input_generator(seed, epoch, "validate", device))
        row = {"epoch": epoch + 1, "loss": float(total_loss) / seen, "train_acc": int(correct) / seen,
               "val_noisy_acc": val, "lr": rate, "seconds": time.perf_counter() - began}
        history.append(row)
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f}  train acc {row['train_acc']:.4f}  "
                       + (f"val noisy acc {val:.4f}  " if val is not None else "")
                       + f"lr {rate:.3g}  {row['seconds']:.1f}s")
        if paths is not None:
            _save_epoch(paths, model, opt, settings, config, history, epoch + 1)
    return history


def _save_epoch(paths, model, opt, settings, config, history, epoch) -> None:
    from .checkpoint import save_checkpoint

    full = {"sigma": settings["sigma"], **(config or {}),
            "training": {**settings, "epochs_done": epoch, "history": history}}
    save_checkpoint(paths["prefix"], model, full)
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(), "settings": settings,
             "history": history}
    _write_atomic(paths["state"], lambda tmp: torch.save(state, tmp))
    _write_log(paths["log"], history)


# ------------------------------------------------------------------------------------------------ command line

_HYPER_FLAGS = {
    "num_noise": ("--num-noise", int, "noisy copies per input: m (gaussian 1, consistency 2, smoothadv 4) "
                  "or MACER's k (16)"),
    "lbd": ("--lbd", float, "weight of the consistency KL term (default 10) or MACER's hinge (default 12)"),
    "eta": ("--eta", float, "consistency: weight of the entropy of the mean prediction (default 0.5)"),
    "gamma": ("--gamma", float, "MACER: hinge threshold on Phi^-1(p_A) - Phi^-1(p_B) (default 8)"),
    "beta": ("--beta", float, "MACER: inverse temperature (default 16)"),
    "epsilon": ("--epsilon", float, "SmoothAdv: l2 attack radius in input units (default 1.0; 0.5 suits MNIST)"),
    "steps": ("--pgd-steps", int, "SmoothAdv: PGD steps (default 10)"),
    "warmup": ("--warmup", int, "SmoothAdv: epochs of linear epsilon warm-up (default 10); MACER: epochs before "
               "the radius hinge joins (default 0)"),
}


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``smoothcert train``."""
    parser.add_argument("--dataset", required=True, help="data set name (see smoothcert.data.DATASETS)")
    parser.add_argument("--data-root", default=None, help="directory of data sets read from disk (cifar10)")
    parser.add_argument("--arch", default=None,
                        help="architecture (smoothcert.models.ARCHITECTURES; default: the data set's default)")
    parser.add_argument("--objective", default="gaussian", choices=list(OBJECTIVES), help="training objective")
    parser.add_argument("--sigma", type=float, required=True,
                        help="noise level in input units, pixels in [0, 1]; train at the sigma you certify with")
    parser.add_argument("--epochs", type=int, default=10, help="default 10")
    parser.add_argument("--batch-size", type=int, default=128, help="default 128")
    parser.add_argument("--lr", type=float, default=0.01, help="initial learning rate (default 0.01)")
    parser.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help="sgd (with momentum) or adam")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="default 1e-4")
    parser.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient's l2 norm to this")
    parser.add_argument("--schedule", default="step", choices=SCHEDULES,
                        help="step: x0.1 at the milestones (default 1/3 and 2/3 of the epochs); cosine; constant")
    parser.add_argument("--milestones", type=int, nargs="+", default=None, help="epochs at which step decays")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights, shuffling and noise")
    parser.add_argument("--out", required=True, help="path prefix of the checkpoint (.safetensors/.json), "
                        "log (.train.tsv) and resume state (.state.pt)")
    parser.add_argument("--resume", action="store_true", help="continue the run at --out after its last epoch")
    parser.add_argument("--pca-fraction", type=float, default=None,
                        help="put a PCA projection first in the model, keeping components with variance above "
                             "this fraction of sigma^2 (seed 002: 0.2; ablation 0.1)")
    parser.add_argument("--val-size", type=int, default=1000,
                        help="test inputs (the first ones) on which to report accuracy under noise each epoch "
                             "(monitoring only: the saved model is the last epoch's; 0 = none)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, (flag, kind, text) in _HYPER_FLAGS.items():
        parser.add_argument(flag, dest=f"hp_{name}", type=kind, default=None, help=text,
                            metavar=flag.lstrip("-").upper().replace("-", "_"))
    return parser


class _Subset:
    """The first ``size`` items of a data set that supports ``batch``."""

    def __init__(self, dataset, size: int):
        self.dataset, self.size = dataset, min(size, len(dataset))

    def __len__(self) -> int:
        return self.size

    def batch(self, rows):
        return self.dataset.batch(rows)


def run_train(args: argparse.Namespace) -> int:
    """``smoothcert train``: build the model (optionally with a PCA first layer), train, save; returns 0."""
    from .cli import resolve_device
    from .data import load_dataset
    from .models import model_for_dataset
    from .pca import add_pca, fit_pca

    hyper = {name: getattr(args, f"hp_{name}") for name in _HYPER_FLAGS}
    hyper["k" if args.objective == "macer" else "m"] = hyper.pop("num_noise")
    objective = make_objective(args.objective, **hyper)
    device = resolve_device(args.device)
    train_set = load_dataset(args.dataset, "train", args.data_root)
    val_set = _Subset(load_dataset(args.dataset, "test", args.data_root), args.val_size) if args.val_size > 0 else None
    paths = _paths(args.out)
    # the same seed rebuilds the same initial model (and PCA layer); a resumed run then loads its saved state
    torch.manual_seed(args.seed)
    model = model_for_dataset(args.dataset, args.arch)
    config: dict[str, Any] = {"dataset": args.dataset}
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
          progress=not args.no_progress, device=device, config=config)
    print(f"saved {paths['prefix']}.safetensors, log {paths['log']}")
    return 0

