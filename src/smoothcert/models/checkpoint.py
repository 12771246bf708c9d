"""Save and load base classifiers without pickle: ``<path>.safetensors`` (weights) + ``<path>.json`` (config).

The JSON config holds what rebuilds the model: ``arch``, ``arch_kwargs`` (the builder's full argument list)
and ``wrappers`` (see :mod:`smoothcert.models`), plus ``num_classes``, ``input_shape``, ``dataset``,
``sigma`` (the training noise level, in input units where pixels lie in [0, 1]) and any extra entries the
caller passes (training information, ...), ``smoothcert_version`` and ``format_version``.

Foreign weights: a ``.pt`` / ``.pth`` / ``.pth.tar`` file is read only with ``torch.load(weights_only=True)``
(a state dict, or a dict holding one under ``"state_dict"`` as in Cohen et al.'s checkpoints). Its config
comes from the ``config`` argument, a JSON file beside it with the same stem, or, for Cohen et al.'s
``cifar_resnet20`` / ``cifar_resnet110`` checkpoints, from their ``"arch"`` entry. Such files carry no
normalization buffers; those then keep the values of the config.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import metadata
from typing import Any

import torch
from torch import nn

from smoothcert.models.architectures import Normalize, jsonable, arch_arguments, model_from_spec, model_spec

__all__ = ["save_checkpoint", "load_checkpoint", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_REQUIRED = ("arch", "arch_kwargs", "num_classes", "input_shape")
_TORCH_SUFFIXES = (".pth.tar", ".pt", ".pth")
_COHEN_ARCHS = {"cifar_resnet20": "resnet20", "cifar_resnet110": "resnet110"}


def _version() -> str:
    try:
        return metadata.version("smoothcert")
    except metadata.PackageNotFoundError:
        return "unknown"


def _stem(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    for suffix in (".safetensors", ".json", *_TORCH_SUFFIXES):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions a plain open() would give, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(path: str | os.PathLike, model: nn.Module, config: dict[str, Any] | None = None) -> str:
    """Write ``<path>.safetensors`` and ``<path>.json`` atomically; return the stem ``<path>``.

    ``config`` adds to (and overrides) the spec recorded by :func:`~smoothcert.models.build_model`; a model
    built elsewhere needs ``config={"arch": ..., "arch_kwargs": {...}}`` naming a registered architecture.
    Typical extra keys: ``dataset``, ``sigma`` (noise level in input units), ``training`` (a dict).
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    record: dict[str, Any] = {"format_version": FORMAT_VERSION, "wrappers": []}
    record.update(model_spec(model) or {})
    record.update(jsonable(config or {}))
    kwargs = record.get("arch_kwargs")
    if "arch" not in record or not isinstance(kwargs, dict):
        raise ValueError("cannot tell how to rebuild this model: build it with smoothcert.models.build_model or "
                         "pass config={'arch': <registered name>, 'arch_kwargs': {...}}")
    kwargs = record["arch_kwargs"] = arch_arguments(record["arch"], **kwargs)  # complete and check them
    for key in ("num_classes", "input_shape"):  # config, else what the model declares, else its arch's
        declared = getattr(model, key, None)
        record.setdefault(key, jsonable(declared) if declared is not None else kwargs.get(key))
        if record[key] is None:
            raise ValueError(f"config needs {key!r} (not found in it nor in arch_kwargs)")
    record["smoothcert_version"] = _version()
    try:
        text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config must be JSON-serializable (strings, numbers, lists, dicts): {err}") from err

    # Clone each tensor: safetensors refuses tensors that share memory (e.g. tied weights).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    stem = _stem(path)
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    _atomic_write(stem + ".safetensors",
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "arch": str(record["arch"])}))

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text + "\n")

    _atomic_write(stem + ".json", write_json)
    return stem


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as err:
        raise ValueError(f"cannot read checkpoint config {path}: {err.strerror or err}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint config {path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"checkpoint config {path} must hold a JSON object, got {type(config).__name__}")
    return config


def _check_config(config: dict[str, Any], source: str) -> None:
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ValueError(f"checkpoint config {source} lacks {', '.join(missing)}; required: {', '.join(_REQUIRED)}")
    if not isinstance(config["arch_kwargs"], dict):
        raise ValueError(f"checkpoint config {source}: 'arch_kwargs' must be an object")


def _build(config: dict[str, Any], source: str) -> nn.Module:
    _check_config(config, source)
    kwargs = dict(config["arch_kwargs"])
    if not config.get("wrappers"):
        kwargs.setdefault("num_classes", config["num_classes"])
        kwargs.setdefault("input_shape", config["input_shape"])
    try:
        return model_from_spec({"arch": config["arch"], "arch_kwargs": kwargs, "wrappers": config.get("wrappers")})
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"checkpoint config {source} does not describe a model that can be built: {err}") from err


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, allow_missing_normalize: bool) -> None:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} does not hold a state dict (a mapping of names to tensors)")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if allow_missing_normalize:
        normalize = {f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, Normalize)
                     for b in ("mean", "std")}
        missing = [k for k in missing if k not in normalize]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        def show(items):
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
        problems = [f"missing {show(missing)}" if missing else "", f"unexpected {show(unexpected)}" if unexpected
                    else "", f"wrong shape (file vs model) {show(wrong)}" if wrong else ""]
        raise ValueError(f"weights in {source} do not match the architecture: "
                         + "; ".join(p for p in problems if p))
    model.load_state_dict(state, strict=not allow_missing_normalize)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu",
                    config: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_checkpoint` (or a foreign ``.pt``/``.pth`` state dict).

    ``path`` may name the stem, the ``.safetensors`` or the ``.json`` file. ``config`` replaces the JSON
    config (needed for a ``.pt`` file without one). Returns ``(model, config)`` with the model on ``device``
    in eval mode. Every problem (missing file, corrupt weights, incomplete config, weights that do not fit the
    architecture) raises a ValueError saying what is wrong.
    """
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    path = os.fspath(path)
    if path.endswith(_TORCH_SUFFIXES):
        model, config = _load_torch(path, config)
    else:
        model, config = _load_safetensors(_stem(path), config)
    return model.to(device).eval(), config


def _load_safetensors(stem: str, config: dict[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
    from safetensors.torch import load_file

    weights, json_path = stem + ".safetensors", stem + ".json"
    if not os.path.isfile(weights):
        raise ValueError(f"no checkpoint weights at {weights} (a checkpoint is {stem}.safetensors + {stem}.json)")
    if config is None:
        if not os.path.isfile(json_path):
            raise ValueError(f"no checkpoint config at {json_path} (a checkpoint is {stem}.safetensors + .json)")
        config = _read_json(json_path)
        source = json_path
    else:
        source = "passed as config"
    model = _build(config, source)
    try:
        state = load_file(weights)
    except Exception as err:  # safetensors raises its own error type for corrupt or truncated files
        raise ValueError(f"{weights} is not a readable safetensors file (corrupt or truncated?): {err}") from err
    _load_state(model, state, weights, allow_missing_normalize=False)
    return model, config


def _load_torch(path: str, config: dict[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} cannot be read with torch.load(weights_only=True) (only tensors and plain "
                         f"containers are allowed): {err}") from err
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict, got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    if config is None:
        json_path = _stem(path) + ".json"
        if os.path.isfile(json_path):
            config = _read_json(json_path)
        elif isinstance(obj, dict) and obj.get("arch") in _COHEN_ARCHS:
            config = {"arch": _COHEN_ARCHS[obj["arch"]], "arch_kwargs": {}, "num_classes": 10,
                      "input_shape": [3, 32, 32], "dataset": "cifar10", "source": "cohen-et-al"}
        else:
            raise ValueError(f"{path} holds weights only: pass config={{'arch': ..., 'arch_kwargs': {{...}}, "
                             f"'num_classes': ..., 'input_shape': [...]}} or put {json_path} beside it")
    model = _build(config, "for " + path)
    _load_state(model, state, path, allow_missing_normalize=True)
    return model, config
