"""What several commands share: the device, the base classifier and its fingerprint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from smoothcert.models.checkpoint import load_checkpoint
from smoothcert.models.denoiser import DenoisedClassifier, check_compatible
from smoothcert.models.ensemble import Ensemble


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the current accelerator when there is one, else the CPU."""
    if name == "auto":
        acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return acc if acc is not None else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, or an accelerator such as cuda:0") from e
    if device.type != "cpu":
        try:  # a device torch was not built for, or that this machine lacks, fails here rather than mid-run
            torch.empty(1, device=device)
        except (AssertionError, RuntimeError) as e:
            reason = (" ".join(str(e).split()) or type(e).__name__).split(". ")[0][:160]
            raise ValueError(f"device {name!r} is not available on this machine ({reason}); use --device cpu "
                             "or --device auto") from e
    return device


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_path(path: str) -> Path:
    """The weights file of a checkpoint named by its stem or its file."""
    found = [c for c in (Path(path), Path(f"{path}.safetensors")) if c.is_file()]
    if not found:
        raise ValueError(f"no checkpoint weights at {path} or {path}.safetensors")
    return found[0]


def load_denoised(model: torch.nn.Module, config: dict, path: str, device: torch.device):
    """``model o D`` for the denoiser checkpoint at ``path`` (its input shape checked against the classifier's and
    its output shape against its input); returns (composed model, denoiser fingerprint with its sigma)."""
    denoiser, dconfig = load_checkpoint(path, device=device)
    check_compatible(config, dconfig)
    composed = DenoisedClassifier(model, denoiser, config["input_shape"]).to(device).eval()
    return composed, {"path": str(path), "sha256": file_digest(weights_path(path)), "sigma": dconfig.get("sigma")}


def load_base_classifier(paths: list[str], device: torch.device):
    """One checkpoint, or several averaged by soft voting (an ensemble); returns (model, config, fingerprint)."""
    loaded = [load_checkpoint(p, device=device) for p in paths]
    fingerprint = []
    for p in paths:
        fingerprint.append({"path": str(p), "sha256": file_digest(weights_path(p))})
    if len(loaded) == 1:
        model, config = loaded[0]
    else:
        model = Ensemble([m for m, _ in loaded])
        config = {**loaded[0][1], "ensemble": [c for _, c in loaded]}
    return model.to(device).eval(), config, fingerprint
