"""Soft-voting ensembles of base classifiers (Horvath et al., the "Ensemble (m=3)" rows of seed 002 table 5.1).

``Ensemble(models)(x) = log(1/M sum_j softmax(f_j(x)))``: the argmax of these scores is the soft vote, and the
ensemble is one base classifier, smoothed and certified like any other (averaging reduces the variance of the
base classifier under noise, which raises p_A).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from smoothcert.models.architectures import model_spec

__all__ = ["Ensemble", "load_ensemble"]


def _declared(model: nn.Module, key: str):
    value = getattr(model, key, None)
    if value is None:
        value = ((model_spec(model) or {}).get("arch_kwargs") or {}).get(key)
    return value


class Ensemble(nn.Module):
    """Soft vote of ``models``: returns ``log`` of the average of their softmax probabilities, ``(B, K)``.

    Members must agree on the input shape and the number of classes: what each member declares (attributes
    ``input_shape`` / ``num_classes``, or the spec recorded by :func:`smoothcert.models.build_model`) is
    compared, and once an input shape is known (declared or given) every member runs once on a zero input of
    that shape and its output width is compared too. Mismatches raise ``ValueError``.
    """

    def __init__(self, models: Sequence[nn.Module], input_shape: Sequence[int] | None = None):
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("an ensemble needs at least one model")
        for j, model in enumerate(models):
            if not isinstance(model, nn.Module):
                raise TypeError(f"ensemble member {j} must be a torch.nn.Module, got {type(model).__name__}")
        self.members = nn.ModuleList(models)
        shapes = {tuple(int(s) for s in v) for v in (_declared(m, "input_shape") for m in models) if v is not None}
        if input_shape is not None:
            shapes.add(tuple(int(s) for s in input_shape))
        if len(shapes) > 1:
            raise ValueError(f"ensemble members expect different input shapes: {sorted(shapes)}")
        declared = {int(v) for v in (_declared(m, "num_classes") for m in models) if v is not None}
        if len(declared) > 1:
            raise ValueError(f"ensemble members have different numbers of classes: {sorted(declared)}")
        if shapes:
            self.input_shape = shapes.pop()
            declared |= self._probe_widths()
            if len(declared) > 1:
                raise ValueError(f"ensemble members have different numbers of classes: {sorted(declared)}")
        if declared:
            self.num_classes = declared.pop()

    def _probe_widths(self) -> set[int]:
        widths = set()
        param = next(self.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        probe = torch.zeros((1, *self.input_shape), device=device)
        with torch.no_grad():
            for j, model in enumerate(self.members):
                was_training = model.training
                model.eval()
                try:
                    out = model(probe)
                except RuntimeError as err:
                    raise ValueError(f"ensemble member {j} does not accept inputs of shape {self.input_shape}: "
                                     f"{err}") from err
                finally:
                    model.train(was_training)
                if out.ndim != 2 or out.shape[0] != 1:
                    raise ValueError(f"ensemble member {j} returned shape {tuple(out.shape)} for one input; "
                                     "expected (1, num_classes)")
                widths.add(int(out.shape[1]))
        return widths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = [torch.log_softmax(model(x).float(), dim=1) for model in self.members]
        if len({lp.shape for lp in log_probs}) > 1:
            raise ValueError(f"ensemble members returned different output shapes: "
                             f"{sorted({tuple(lp.shape) for lp in log_probs})}")
        return torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(self.members))


def load_ensemble(paths: Sequence[str | Path], device: torch.device | str | None = None) -> Ensemble:
    """An :class:`Ensemble` of the checkpoints at ``paths`` (see :func:`smoothcert.checkpoint.load_checkpoint`),
    in eval mode, on ``device`` (default: the CPU)."""
    from smoothcert.models.checkpoint import load_checkpoint

    paths = list(paths)
    if not paths:
        raise ValueError("load_ensemble needs at least one checkpoint path")
    models = []
    for path in paths:
        model, _ = load_checkpoint(path, device=device if device is not None else "cpu")
        models.append(model.eval())
    return Ensemble(models)
