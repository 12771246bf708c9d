"""Training a denoiser in front of a frozen classifier (Salman et al., NeurIPS 2020, section 3).

Objectives (``delta ~ N(0, sigma^2 I)`` in input units, pixels in [0, 1]; ``F`` the frozen classifier, ``D`` the
denoiser):

- ``mse``: ``E ||D(x + delta) - x||_2^2 / d`` (the mean over pixels of the squared error to the clean image);
- ``stability``: ``E CE(F(D(x + delta)), argmax F(x))``: the classifier's prediction on the denoised noisy input
  should stay its prediction on the clean input;
- ``stab-mse``: their sum.

Query access (Salman et al.'s black-box setting with a surrogate): the classifier being certified is only
*queried* on clean inputs for the labels ``argmax F(x)``; gradients flow through a ``surrogate`` classifier
instead, ``CE(S(D(x + delta)), argmax F(x))``. Without a surrogate, gradients flow through ``F`` itself (full
access). ``F`` and the surrogate are frozen (eval mode, no parameter updates).

The loop is seeded and resumable like :mod:`smoothcert.training.loop`: the shuffle and the noise of epoch ``e``
come from streams of :func:`~smoothcert.engine.sampling.input_generator` keyed by ``(seed, e)``, and after each
epoch ``{out}.safetensors`` + ``{out}.json`` (the denoiser checkpoint), ``{out}.train.tsv`` (one row per epoch)
and ``{out}.state.pt`` (denoiser, Adam state, history; loaded with ``weights_only=True``) are written, so a run
resumed after epoch ``e`` continues as if it had never stopped.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from smoothcert.engine.sampling import input_generator
from smoothcert.models.checkpoint import save_checkpoint
from smoothcert.models.denoiser import DENOISER_ROLE, check_denoiser
from smoothcert.validation import check_count, check_positive

__all__ = ["DENOISER_OBJECTIVES", "denoiser_loss", "train_denoiser", "DENOISER_LOG_COLUMNS"]

DENOISER_OBJECTIVES = ("mse", "stability", "stab-mse")
DENOISER_LOG_COLUMNS = ("epoch", "loss", "mse", "stability", "seconds")


def denoiser_loss(denoiser: nn.Module, classifier: nn.Module | None, x: torch.Tensor, noise: torch.Tensor,
                  objective: str, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective's loss on the batch ``x`` with the drawn ``noise``; returns ``(loss, {"mse", "stability"})``.

    ``labels`` are the targets of the stability term (``argmax F(x)`` of the certified classifier); ``classifier``
    is the one gradients flow through (the certified one, or the surrogate under query access).
    """
    if objective not in DENOISER_OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(DENOISER_OBJECTIVES)}, got {objective!r}")
    out = denoiser(x + noise)
    parts: dict[str, torch.Tensor] = {}
    if objective in ("mse", "stab-mse"):
        parts["mse"] = F.mse_loss(out, x)
    if objective in ("stability", "stab-mse"):
        if classifier is None or labels is None:
            raise ValueError(f"the {objective} objective needs a classifier and labels")
        parts["stability"] = F.cross_entropy(classifier(out), labels)
    loss = sum(parts.values())
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def _write_log(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=DENOISER_LOG_COLUMNS, delimiter="\t", extrasaction="ignore")
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, path)


def train_denoiser(denoiser: nn.Module, classifier: nn.Module, train_set, *, objective: str, sigma: float,
                   epochs: int, out: str | os.PathLike, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                   surrogate: nn.Module | None = None, resume: bool = False, progress: bool = True,
                   device: torch.device | str = "cpu", config: dict[str, Any] | None = None
                   ) -> list[dict[str, Any]]:
    """Train ``denoiser`` in place (Adam at ``lr``) against the frozen ``classifier``; return the history.

    ``train_set`` supports ``len`` and ``batch(indices) -> (x, y)`` (its labels are not used: the targets are
    the classifier's own predictions). ``surrogate``: query access (see the module). ``config`` adds entries to
    the checkpoint's JSON. Every argument is checked before any file is written.
    """
    if objective not in DENOISER_OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(DENOISER_OBJECTIVES)}, got {objective!r}")
    sigma = check_positive("sigma (noise level, in input units where pixels lie in [0, 1])", sigma)
    check_count("epochs", epochs)
    check_count("batch_size", batch_size)
    check_positive("lr", lr)
    check_count("seed", seed, minimum=0)
    if len(train_set) == 0:
        raise ValueError("the training set is empty")
    device = torch.device(device)
    x0, _ = train_set.batch([0])
    shape = tuple(x0.shape[1:])
    denoiser.to(device)
    check_denoiser(denoiser, shape, device)
    grad_model = (surrogate if surrogate is not None else classifier).to(device).eval()
    classifier.to(device).eval()
    for p in list(classifier.parameters()) + list(grad_model.parameters()):
        p.requires_grad_(False)
    prefix = str(out)
    paths = {"state": Path(prefix + ".state.pt"), "log": Path(prefix + ".train.tsv")}
    settings = {"objective": objective, "sigma": sigma, "batch_size": batch_size, "lr": lr, "seed": seed,
                "query_access": surrogate is not None}
    opt = torch.optim.Adam(denoiser.parameters(), lr=lr)
    history: list[dict[str, Any]] = []
    start = 0
    if resume:
        if not paths["state"].is_file():
            raise ValueError(f"nothing to resume: no {paths['state']}")
        state = torch.load(paths["state"], map_location=device, weights_only=True)
        saved = {k: state["settings"][k] for k in settings}
        if saved != settings:
            raise ValueError(f"cannot resume: the run at {prefix} has settings {saved}, now {settings}")
        try:
            denoiser.load_state_dict(state["model"])
        except RuntimeError as err:
            raise ValueError(f"cannot resume: the denoiser saved at {prefix} has another architecture: {err}") from err
        opt.load_state_dict(state["optimizer"])
        history, start = list(state["history"]), int(state["epoch"])
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    n = len(train_set)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        shuffle = input_generator(seed, epoch, "denoiser-shuffle")
        noise_gen = input_generator(seed, epoch, "denoiser-noise", device)
        order = torch.randperm(n, generator=shuffle)
        denoiser.train()
        total, sums, batches = 0.0, {"mse": 0.0, "stability": 0.0}, 0
        bar = tqdm(range(0, n, batch_size), desc=f"denoiser epoch {epoch + 1}/{epochs}", disable=not progress,
                   leave=False)
        for s in bar:
            x, _ = train_set.batch(order[s:s + batch_size])
            x = x.to(device)
            noise = torch.randn(x.shape, generator=noise_gen, device=device) * sigma
            labels = None
            if objective != "mse":
                with torch.no_grad():
                    labels = classifier(x).argmax(dim=1)  # queries of the certified classifier on clean inputs
            loss, parts = denoiser_loss(denoiser, grad_model, x, noise, objective, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            for k, v in parts.items():
                sums[k] += v
            batches += 1
            bar.set_postfix(loss=f"{total / batches:.4f}")
        denoiser.eval()
        row = {"epoch": epoch + 1, "loss": total / batches, "mse": sums["mse"] / batches,
               "stability": sums["stability"] / batches, "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        record = {**(config or {}), "role": DENOISER_ROLE, "sigma": sigma, "num_classes": 0,
                  "input_shape": list(shape), "training": {**settings, "epochs": epoch + 1}}
        save_checkpoint(prefix, denoiser, record)
        _write_log(paths["log"], history)
        tmp = paths["state"].with_name(paths["state"].name + ".tmp")
        torch.save({"model": denoiser.state_dict(), "optimizer": opt.state_dict(), "history": history,
                    "epoch": epoch + 1, "settings": settings}, tmp)
        os.replace(tmp, paths["state"])
        if progress:
            print(f"denoiser epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f} (mse {row['mse']:.4f}, "
                  f"stability {row['stability']:.4f})")
    denoiser.eval()
    return history
