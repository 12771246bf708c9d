"""One training loop for every objective of :mod:`smoothcert.objectives`, resumable and reproducible.

``train`` runs SGD with momentum (or Adam) under a step or cosine learning-rate schedule. Each epoch it
shuffles the training set, minimizes the objective's loss on noisy copies of the inputs (noise added in input
space, pixels in [0, 1], at the certification ``sigma``), measures the base classifier's accuracy under noise
on a validation set, and writes as it goes:

- ``{out}.safetensors`` + ``{out}.json``: the model and its configuration (:mod:`smoothcert.checkpoint`);
- ``{out}.train.tsv``: one row per epoch (epoch, loss, train_acc, val_noisy_acc, lr, seconds);
- ``{out}.state.pt``: what resuming needs (model, optimizer state, epoch, history), loaded with
  ``weights_only=True``.

``init`` warm-starts a run from a saved checkpoint of the same architecture and input shape (:func:`warm_start`):
its weights replace the fresh ones before the first epoch, and its path and a digest of its weights are recorded
with the training settings (so a resumed run must name the same initial weights).

Randomness is a pure function of ``(seed, epoch)`` (streams of :func:`smoothcert.sampling.input_generator`
with the epoch as index): the shuffle, the training noise, the validation noise and
torch's global generator (dropout) are reseeded from them at each epoch (inside ``fork_rng``, so the caller's
global state is untouched). The learning rate is a pure function of the epoch. So the same seed gives the
same weights, and a run resumed after epoch ``e`` continues exactly as if it had never stopped.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from smoothcert.training.objectives import Objective, make_objective
from smoothcert.engine.sampling import input_generator
from smoothcert.progress import progress as progress_reporter
from smoothcert.noise.families import family, unit_draws
from smoothcert.validation import check_count, check_positive

__all__ = ["train", "noisy_accuracy", "learning_rate", "warm_start", "weights_digest", "LOG_COLUMNS",
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
                   generator: torch.Generator | None = None, device: torch.device | str | None = None,
                   noise: str = "gaussian") -> float:
    """Accuracy of the base classifier on ``x + sigma w``, ``w`` of the ``noise`` family with standard deviation 1
    (Gaussian: ``x + N(0, sigma^2 I)``), one draw per input (model in eval mode)."""
    family(noise)
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        with torch.inference_mode():
            for x, y in _batches(dataset, batch_size, None, device):
                noisy = x + sigma * unit_draws(noise, x.shape, generator=generator, device=device)
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


def train_paths(out: str | os.PathLike) -> dict[str, Path]:
    prefix = Path(out)
    if prefix.suffix in (".safetensors", ".json"):
        prefix = prefix.with_suffix("")
    return {"prefix": prefix, "log": prefix.with_name(prefix.name + ".train.tsv"),
            "state": prefix.with_name(prefix.name + ".state.pt")}


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``model``'s state dict (in its order)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _describe(arch: Any, shape: Any, classes: Any) -> str:
    return f"arch {arch}, input shape {list(shape) if shape is not None else None}, {classes} classes"


def warm_start(model: nn.Module, init: str | os.PathLike, *, load: bool = True) -> dict[str, str]:
    """Copy the weights of the checkpoint ``init`` into ``model`` (``load=False``: only check that they fit).

    The checkpoint (:func:`smoothcert.models.checkpoint.load_checkpoint`) must describe the same architecture,
    input shape and number of classes as ``model`` and its state dict must have the same names and shapes;
    otherwise ``ValueError`` (``init (--init) must be ...``) before anything is changed. Returns the record
    saved with the training settings: ``{"path": init, "sha256": weights_digest(source)}``.
    """
    from smoothcert.models.architectures import model_spec
    from smoothcert.models.checkpoint import load_checkpoint

    what = "init (--init) must be a saved checkpoint of the model being trained"
    try:
        source, config = load_checkpoint(init)
    except ValueError as err:
        raise ValueError(f"{what}, got {os.fspath(init)!r}: {err}") from err
    spec = model_spec(model) or {}
    kwargs = spec.get("arch_kwargs") or {}
    mine = (spec.get("arch"), getattr(model, "input_shape", None) or kwargs.get("input_shape"),
            getattr(model, "num_classes", None) or kwargs.get("num_classes"))
    theirs = (config.get("arch"), config.get("input_shape"), config.get("num_classes"))
    differ = [i for i in range(3) if mine[i] is not None
              and (list(mine[i]) != list(theirs[i]) if i == 1 else mine[i] != theirs[i])]
    target, state = model.state_dict(), source.state_dict()
    wrong = sorted(set(target) ^ set(state)) + [k for k in target if k in state and target[k].shape != state[k].shape]
    if differ or wrong:
        detail = f" (weights that differ: {', '.join(wrong[:5])})" if wrong and not differ else ""
        raise ValueError(f"{what} ({_describe(*mine)}), got {os.fspath(init)!r} with {_describe(*theirs)}{detail}")
    if load:
        with torch.no_grad():
            for name, tensor in target.items():
                tensor.copy_(state[name])
    return {"path": os.fspath(init), "sha256": weights_digest(source)}


#: training settings that must agree between a run and its resumption
_RESUME_KEYS = ("objective", "sigma", "seed", "batch_size", "lr", "schedule", "optimizer", "milestones",
                "momentum", "weight_decay", "clip_grad_norm", "noise", "init")
_RESUME_DEFAULTS = {"noise": "gaussian", "init": None}  # what a run saved before the setting existed used


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
    noise: str = "gaussian",
    init: str | os.PathLike | None = None,
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
    :data:`LOG_COLUMNS`. ``noise`` names the noise family (:data:`smoothcert.noise.families.FAMILIES`) the
    objective sees: ``x + sigma w`` with ``w`` of that family at standard deviation 1 (``sigma`` is the
    per-coordinate standard deviation for every family), drawn here and handed to the objective; Gaussian draws
    are exactly the ones the objectives draw themselves. ``init`` names a checkpoint of the same architecture and
    input shape whose weights replace ``model``'s before the first epoch (:func:`warm_start`; a resumed run
    loads its saved state instead, after checking that ``init`` still fits and is the one it started from).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sigma = check_positive("sigma (noise level, in input units where pixels lie in [0, 1])", sigma)
    check_count("epochs", epochs)
    check_count("batch_size", batch_size)
    check_positive("lr", lr)
    if clip_grad_norm is not None:
        check_positive("clip_grad_norm", clip_grad_norm)
    check_count("seed", seed, minimum=0)
    family(noise)
    if len(train_set) == 0:
        raise ValueError("the training set is empty")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    learning_rate(schedule, lr, 0, epochs, milestones)   # validates the schedule name
    if resume and out is None:
        raise ValueError("resume=True needs out, the path prefix of the run to resume")
    objective = make_objective(objective)
    device = torch.device(device) if device is not None else _model_device(model)
    resuming = resume and train_paths(out)["state"].is_file()
    started_from = warm_start(model, init, load=not resuming) if init is not None else None
    model.to(device)

    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    settings = {"objective": objective.name, "objective_config": objective.config(), "sigma": sigma,
                "seed": seed, "batch_size": batch_size, "lr": lr, "schedule": schedule,
                "milestones": list(milestones) if milestones is not None else None, "optimizer": optimizer,
                "momentum": momentum, "weight_decay": weight_decay, "clip_grad_norm": clip_grad_norm,
                "epochs": epochs, "noise": noise, "init": started_from}
    paths = train_paths(out) if out is not None else None
    history: list[dict[str, Any]] = []
    start = 0
    if resuming:
        state = torch.load(paths["state"], map_location=device, weights_only=True)
        saved = state["settings"]
        differ = [k for k in _RESUME_KEYS if saved.get(k, _RESUME_DEFAULTS.get(k)) != settings.get(k)]
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

    steps = math.ceil(len(train_set) / batch_size)
    # one stage for the whole run: a bar on a terminal, a plain line every few percent in a log
    bar = progress_reporter(epochs * steps, initial=start * steps, enabled=progress, unit="batch", desc="train")
    for epoch in range(start, epochs):
        began = time.perf_counter()
        rate = learning_rate(schedule, lr, epoch, epochs, milestones)
        for group in opt.param_groups:
            group["lr"] = rate
        objective.start_epoch(epoch)
        shuffle = input_generator(seed, epoch, "shuffle")
        draws = input_generator(seed, epoch, "train-noise", device)
        total_loss = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        with _fork_rng(device):
            torch.manual_seed(input_generator(seed, epoch, "global").initial_seed())
            model.train()
            for step, (x, y) in enumerate(_batches(train_set, batch_size, shuffle, device)):
                w = unit_draws(noise, (x.shape[0], objective.num_noise, *x.shape[1:]), generator=draws, device=device)
                loss, scores = objective.loss(model, x, y, sigma, generator=draws, noise=w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
                opt.step()
                total_loss += loss.detach() * len(y)
                correct += (scores.argmax(1) == y).sum()
                seen += len(y)
                bar.update(1)
                if step % 20 == 0 or step == steps - 1:   # one device sync every 20 steps
                    mean_loss = float(total_loss) / seen
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(f"the {objective.name} loss became {mean_loss} in epoch "
                                                 f"{epoch + 1}; lower the learning rate")
                    bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{mean_loss:.4f}",
                                    acc=f"{int(correct) / seen:.3f}")
        val = None
        if val_set is not None:
            val = noisy_accuracy(model, val_set, sigma, batch_size=max(batch_size, 256), device=device,
                                 generator=input_generator(seed, epoch, "validate", device), noise=noise)
        row = {"epoch": epoch + 1, "loss": float(total_loss) / seen, "train_acc": int(correct) / seen,
               "val_noisy_acc": val, "lr": rate, "seconds": time.perf_counter() - began}
        history.append(row)
        if progress:
            bar.write(f"epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f}  train acc {row['train_acc']:.4f}  "
                       + (f"val noisy acc {val:.4f}  " if val is not None else "")
                       + f"lr {rate:.3g}  {row['seconds']:.1f}s")
        if paths is not None:
            _save_epoch(paths, model, opt, settings, config, history, epoch + 1)
    bar.close()
    return history


def _save_epoch(paths, model, opt, settings, config, history, epoch) -> None:
    from smoothcert.models.checkpoint import save_checkpoint

    full = {"sigma": settings["sigma"], "noise": settings["noise"], **(config or {}),
            "training": {**settings, "epochs_done": epoch, "history": history}}
    save_checkpoint(paths["prefix"], model, full)
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(), "settings": settings,
             "history": history}
    _write_atomic(paths["state"], lambda tmp: torch.save(state, tmp))
    _write_log(paths["log"], history)
