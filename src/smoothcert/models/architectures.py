"""Base classifiers with normalization inside, and a registry that rebuilds them from a JSON-able spec.

smoothcert adds noise in the model's input space (pixels in [0, 1]), so every model here starts with a
:class:`Normalize` layer. All of them are piecewise linear in the input (linear/conv layers, batch norm in
eval mode, average pooling, ReLU, max-pool), which is what RANCER's Gauss-Newton form of the input Hessian
assumes (seed 000 ch. 4). Any ``nn.Module`` that maps ``(B, *input_shape)`` to ``(B, num_classes)`` scores
works as a base classifier: nothing in the engine requires these classes.

Extension points, both JSON-able so a checkpoint can rebuild the model (:mod:`smoothcert.checkpoint`):

- :func:`register_arch` adds an architecture: ``builder(num_classes, input_shape, **options) -> nn.Module``.
- :func:`register_wrapper` adds a layer kind that wraps a built model (e.g. a projection in front of it, an
  ensemble): ``wrapper(model, **params) -> nn.Module`` with JSON-able ``params``; tensors the wrapper owns
  must be parameters or buffers, so they travel in the weights file. :func:`wrap_model` applies one and
  records it; :func:`model_from_spec` replays ``arch`` then ``wrappers`` in order.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from smoothcert.data.datasets import DATASETS

__all__ = [
    "ARCHITECTURES", "WRAPPERS", "Normalize", "MLP", "MnistCNN", "CifarResNet", "cifar_resnet", "arch_arguments",
    "build_model", "default_arch", "model_for_dataset", "register_arch", "register_wrapper", "wrap_model",
    "model_from_spec", "model_spec",
]

_CIFAR_MEAN = DATASETS["cifar10"].mean
_CIFAR_STD = DATASETS["cifar10"].std
_MNIST_MEAN = DATASETS["mnist"].mean
_MNIST_STD = DATASETS["mnist"].std

#: Spec attribute set on models built here: ``{"arch", "arch_kwargs", "wrappers"}``.
SPEC_ATTR = "smoothcert_spec"


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel (dimension 1): the first layer of every model built here.

    ``mean`` and ``std`` hold one value per channel (or per feature for flat inputs), or one value for all.
    They are buffers, so they are saved with the weights.
    """

    def __init__(self, mean: Sequence[float] | float, std: Sequence[float] | float):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean_t.numel() == 0 or std_t.numel() == 0:
            raise ValueError("mean and std must hold at least one value")
        if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all() and (std_t > 0).all()):
            raise ValueError(f"mean must be finite and std finite and > 0, got mean={mean}, std={std}")
        if mean_t.numel() != std_t.numel() and 1 not in (mean_t.numel(), std_t.numel()):
            raise ValueError(f"mean ({mean_t.numel()} values) and std ({std_t.numel()} values) must match")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - self.mean.view(shape).to(x.dtype)) / self.std.view(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


class MLP(nn.Sequential):
    """Normalize, flatten, then ``Linear -> ReLU`` per hidden size and a final ``Linear``: piecewise linear.

    The shallow classifiers of seed 000 section 5.3.2 (two hidden layers for 2 classes, four for 3).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (64, 64),
                 mean: Sequence[float] | float = 0.5, std: Sequence[float] | float = 0.25):
        sizes = [int(in_features), *(int(h) for h in hidden)]
        layers: list[nn.Module] = [Normalize(mean, std), nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], int(num_classes)))
        super().__init__(*layers)


class MnistCNN(nn.Sequential):
    """A small fast CNN: Normalize, two ``conv3x3 -> ReLU -> maxpool2`` stages, ``fc -> ReLU -> fc``.

    Piecewise linear in the input. Works for any (C, H, W) input (MNIST 28x28, scikit-learn digits 8x8).
    """

    def __init__(self, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28),
                 channels: Sequence[int] = (16, 32), hidden: int = 128,
                 mean: Sequence[float] | float = _MNIST_MEAN, std: Sequence[float] | float = _MNIST_STD):
        c_in, h, w = (int(s) for s in input_shape)
        c1, c2 = (int(c) for c in channels)
        if h < 4 or w < 4:
            raise ValueError(f"MnistCNN needs images of at least 4x4 pixels, got {h}x{w}")
        super().__init__(
            Normalize(mean, std),
            nn.Conv2d(c_in, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * (h // 4) * (w // 4), int(hidden)), nn.ReLU(),
            nn.Linear(int(hidden), int(num_classes)),
        )


class _BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers, 3 stages of n basic blocks with 16/32/64 channels).

    Parameter and module names follow the ``cifar_resnet`` of Cohen et al.'s reference code (projection
    shortcuts ``downsample = conv1x1 + BN``), so their published CIFAR-10 weights load. Piecewise linear in the
    input in eval mode (batch norm is then affine; the final pooling is an average).
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(_BasicBlock(inplanes, planes, stride),
                             *(_BasicBlock(planes, planes) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int, num_classes: int = 10, mean: Sequence[float] = _CIFAR_MEAN,
                 std: Sequence[float] = _CIFAR_STD, in_channels: int = 3) -> nn.Sequential:
    """``Sequential(Normalize(mean, std), CifarResNet(depth))``: the layout of Cohen et al.'s models."""
    return nn.Sequential(Normalize(mean, std), CifarResNet(depth, num_classes, in_channels))


# ------------------------------------------------------------------------------------------------ registry

#: Architecture builders by name: ``builder(num_classes, input_shape, **options) -> nn.Module``.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
#: Wrapper builders by kind: ``wrapper(model, **params) -> nn.Module``.
WRAPPERS: dict[str, Callable[..., nn.Module]] = {}


def register_arch(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``builder(num_classes, input_shape, **options)`` under ``name`` for build_model."""
    def decorate(builder):
        ARCHITECTURES[name] = builder
        return builder
    return decorate


def register_wrapper(kind: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``wrapper(model, **params) -> nn.Module`` under ``kind`` for wrap_model."""
    def decorate(builder):
        WRAPPERS[kind] = builder
        return builder
    return decorate


@register_arch("mlp")
def _mlp(num_classes: int = 2, input_shape: Sequence[int] = (2,), hidden: Sequence[int] = (64, 64),
         mean: Sequence[float] | float = 0.5, std: Sequence[float] | float = 0.25) -> nn.Module:
    return MLP(math.prod(input_shape), num_classes, hidden, mean, std)


@register_arch("mnist-cnn")
def _mnist_cnn(num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28), channels: Sequence[int] = (16, 32),
               hidden: int = 128, mean: Sequence[float] | float = _MNIST_MEAN,
               std: Sequence[float] | float = _MNIST_STD) -> nn.Module:
    return MnistCNN(num_classes, input_shape, channels, hidden, mean, std)


def _resnet_builder(depth: int):
    def build(num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32), mean: Sequence[float] = _CIFAR_MEAN,
              std: Sequence[float] = _CIFAR_STD) -> nn.Module:
        if len(input_shape) != 3:
            raise ValueError(f"resnet{depth} takes images (C, H, W), got input_shape {tuple(input_shape)}")
        return cifar_resnet(depth, num_classes, mean, std, in_channels=int(input_shape[0]))
    return build


register_arch("resnet20")(_resnet_builder(20))
register_arch("resnet110")(_resnet_builder(110))


def jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return value.item()
    return value


def arch_arguments(arch: str, **config: Any) -> dict[str, Any]:
    """The full JSON-able keyword arguments of architecture ``arch`` for ``config``, defaults filled in.

    Raises a ValueError for an unknown architecture or an argument its builder does not take.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    signature = inspect.signature(ARCHITECTURES[arch])
    try:
        bound = signature.bind(**config)
    except TypeError as err:
        allowed = ", ".join(p for p in signature.parameters)
        raise ValueError(f"bad arguments for architecture {arch!r} ({err}); allowed: {allowed}") from None
    bound.apply_defaults()
    return jsonable(dict(bound.arguments))


def build_model(arch: str, **config: Any) -> nn.Module:
    """A freshly initialised model of architecture ``arch`` (see :data:`ARCHITECTURES`).

    ``config`` are the builder's keyword arguments (``num_classes``, ``input_shape``, ``mean``, ``std`` and
    the architecture's options). The full argument list, defaults included, is recorded on the model
    (:func:`model_spec`) so :func:`smoothcert.checkpoint.save_checkpoint` can rebuild it.
    """
    kwargs = arch_arguments(arch, **config)
    model = ARCHITECTURES[arch](**config)
    setattr(model, SPEC_ATTR, {"arch": arch, "arch_kwargs": kwargs, "wrappers": []})
    return model


def model_spec(model: nn.Module) -> dict | None:
    """The ``{"arch", "arch_kwargs", "wrappers"}`` record of a model built here (None for other modules)."""
    spec = getattr(model, SPEC_ATTR, None)
    return copy.deepcopy(spec) if spec is not None else None


def wrap_model(model: nn.Module, kind: str, **params: Any) -> nn.Module:
    """Apply the registered wrapper ``kind`` with JSON-able ``params``; the result's spec records it."""
    if kind not in WRAPPERS:
        raise ValueError(f"unknown wrapper kind {kind!r}; known: {', '.join(sorted(WRAPPERS)) or '(none registered)'}")
    spec = model_spec(model)
    wrapped = WRAPPERS[kind](model, **params)
    if spec is not None:
        spec["wrappers"].append({"kind": kind, **jsonable(params)})
        setattr(wrapped, SPEC_ATTR, spec)
    return wrapped


def model_from_spec(spec: dict) -> nn.Module:
    """Rebuild (fresh weights) from ``{"arch", "arch_kwargs", "wrappers"}``: build the arch, then wrap in order."""
    model = build_model(spec["arch"], **dict(spec.get("arch_kwargs") or {}))
    for entry in spec.get("wrappers") or []:
        if not isinstance(entry, dict) or "kind" not in entry:
            raise ValueError(f"each wrapper entry must be a dict with a 'kind', got {entry!r}")
        params = {k: v for k, v in entry.items() if k != "kind"}
        model = wrap_model(model, entry["kind"], **params)
    return model


_DEFAULT_ARCH = {"mnist": "mnist-cnn", "digits": "mnist-cnn", "toy-curved": "mlp", "toy-rotated": "mlp",
                 "toy-3class": "mlp", "cifar10": "resnet110"}


def default_arch(dataset: str) -> str:
    """The default architecture for a built-in data set (CIFAR-10: ResNet-110 as in Cohen et al.; ResNet-20
    is the fast alternative)."""
    if dataset not in _DEFAULT_ARCH:
        raise ValueError(f"unknown data set {dataset!r}; known: {', '.join(_DEFAULT_ARCH)}")
    return _DEFAULT_ARCH[dataset]


def model_for_dataset(dataset: str, arch: str | None = None, **options: Any) -> nn.Module:
    """``build_model`` with the data set's classes, input shape and normalization (``options`` override)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r}; known: {', '.join(DATASETS)}")
    info = DATASETS[dataset]
    arch = arch or default_arch(dataset)
    config = {"num_classes": info.num_classes, "input_shape": info.input_shape, "mean": info.mean, "std": info.std}
    if arch == "mlp" and dataset.startswith("toy-") and info.num_classes > 2:
        config["hidden"] = (64, 64, 64, 64)  # seed 000 section 5.3.2: four hidden layers for 3 classes
    config.update(options)
    return build_model(arch, **config)
