"""Information selection by linear decomposition (seed 002 section 4.2) as the first layer of a model.

Principal component analysis of the (flattened) training inputs gives orthonormal directions ``v_j`` with
variances ``lambda_j`` (eq. 4.4: ``X' = X W``). Because the directions are orthonormal, isotropic noise
``N(0, sigma^2 I)`` has variance ``sigma^2`` along every one of them, so a direction whose data variance is
far below ``sigma^2`` carries almost no class information once noise is added. We keep the directions with
``lambda_j > fraction * sigma^2`` (seed 002 keeps ``sigma^2 / 5``, ``fraction = 0.2``; its ablation uses
``sigma^2 / 10``) and project onto them:

    x  ->  mu + V V^T (x - mu),      V = [v_1 ... v_k]  (d x k, orthonormal columns).

``P = V V^T`` is an orthogonal projection (``P = P^T = P^2``). It lives *inside* the model, as its first
layer: noise is still added to ``x`` in input space, the smoothed classifier is that of the whole model
``h(x) = f(mu + P (x - mu))``, and every certificate of :mod:`smoothcert.smooth` stays valid as it is.

:func:`add_pca` puts a fitted projection in front of a model built by :mod:`smoothcert.models` through the
registered wrapper kind ``"pca"``, so :func:`smoothcert.checkpoint.save_checkpoint` records it and
:func:`~smoothcert.checkpoint.load_checkpoint` rebuilds it (its tensors travel in the weights file).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from smoothcert.models.architectures import register_wrapper, wrap_model
from smoothcert.validation import check_number, check_positive

__all__ = ["PCAProjection", "ProjectedModel", "fit_pca", "add_pca"]


class PCAProjection(nn.Module):
    """``x -> mu + V V^T (x - mu)`` on flattened inputs; ``mean`` is ``(d,)``, ``components`` is ``(k, d)``
    with orthonormal rows ``v_j^T``, ``variances`` the data variance ``lambda_j`` along each (for the record).
    """

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, variances: torch.Tensor | None = None,
                 input_shape: tuple[int, ...] | None = None):
        super().__init__()
        if components.ndim != 2 or mean.ndim != 1 or components.shape[1] != mean.shape[0]:
            raise ValueError(f"components must be (k, d) and mean (d,), got {tuple(components.shape)} and "
                             f"{tuple(mean.shape)}")
        if components.shape[0] < 1:
            raise ValueError("a PCA projection needs at least one component")
        d = mean.shape[0]
        self.input_shape = tuple(input_shape) if input_shape is not None else (d,)
        if math.prod(self.input_shape) != d:
            raise ValueError(f"input_shape {self.input_shape} does not hold d = {d} values")
        if variances is None:
            variances = torch.full((components.shape[0],), float("nan"))
        self.register_buffer("mean", mean.detach().to(torch.float32).clone())
        self.register_buffer("components", components.detach().to(torch.float32).clone())
        self.register_buffer("variances", variances.detach().to(torch.float32).clone())

    @property
    def num_components(self) -> int:
        return self.components.shape[0]

    def matrix(self) -> torch.Tensor:
        """The projection ``P = V V^T`` (d x d)."""
        return self.components.T @ self.components

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        mean = self.mean.to(flat.dtype)
        v = self.components.to(flat.dtype)
        projected = mean + ((flat - mean) @ v.T) @ v
        return projected.view_as(x)

    def config(self) -> dict[str, Any]:
        return {"num_components": self.num_components, "dim": int(self.mean.shape[0]),
                "input_shape": list(self.input_shape)}

    def extra_repr(self) -> str:
        return f"d={self.mean.shape[0]}, k={self.num_components}"


class ProjectedModel(nn.Module):
    """``model(projection(x))``: a base classifier whose first layer is a :class:`PCAProjection`.

    Forwards ``input_shape`` and ``num_classes`` of the wrapped model when it has them.
    """

    def __init__(self, projection: PCAProjection, model: nn.Module):
        super().__init__()
        self.projection = projection
        self.model = model
        for attribute in ("input_shape", "num_classes"):
            if hasattr(model, attribute):
                setattr(self, attribute, getattr(model, attribute))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.projection(x))


def _check_fraction(fraction: float) -> float:
    return check_number("fraction (of the noise variance sigma^2)", fraction, low=0.0)


def fit_pca(inputs: torch.Tensor, sigma: float, fraction: float = 0.2, *, chunk: int = 8192) -> PCAProjection:
    """Fit the projection on training inputs ``(N, *shape)`` (pixels in [0, 1]) for noise level ``sigma``.

    Keeps the principal directions whose variance exceeds ``fraction * sigma^2`` (seed 002 section 4.2:
    ``fraction = 1/5``; ablation ``1/10``). The covariance is accumulated in float64 over chunks of rows and
    diagonalized with ``torch.linalg.eigh``. Raises ``ValueError`` when no direction passes the threshold.
    """
    if not isinstance(inputs, torch.Tensor) or not torch.is_floating_point(inputs) or inputs.ndim < 2:
        raise TypeError("inputs must be a floating tensor (N, *input_shape)")
    if inputs.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 inputs, got {inputs.shape[0]}")
    check_positive("sigma (input units)", sigma)
    fraction = _check_fraction(fraction)
    n = inputs.shape[0]
    flat = inputs.reshape(n, -1)
    d = flat.shape[1]
    total = torch.zeros(d, dtype=torch.float64)
    for start in range(0, n, chunk):
        total += flat[start:start + chunk].to(device="cpu", dtype=torch.float64).sum(0)
    mean = total / n
    cov = torch.zeros((d, d), dtype=torch.float64)
    for start in range(0, n, chunk):
        centered = flat[start:start + chunk].to(device="cpu", dtype=torch.float64) - mean
        cov += centered.T @ centered
    cov /= n - 1
    variances, vectors = torch.linalg.eigh(cov)             # ascending
    threshold = fraction * sigma ** 2
    keep = variances > threshold
    if not bool(keep.any()):
        raise ValueError(f"no principal component has variance above fraction * sigma^2 = {threshold:.4g} "
                         f"(largest variance {float(variances[-1]):.4g}); lower fraction or sigma")
    order = torch.argsort(variances, descending=True)
    order = order[keep[order]]
    return PCAProjection(mean, vectors[:, order].T, variances[order], tuple(inputs.shape[1:]))


@register_wrapper("pca")
def _pca_wrapper(model: nn.Module, num_components: int, dim: int, input_shape: list[int]) -> ProjectedModel:
    """Rebuild a projected model with an empty projection of the recorded size (the weights file fills it)."""
    projection = PCAProjection(torch.zeros(dim), torch.zeros(num_components, dim), torch.zeros(num_components),
                               tuple(input_shape))
    return ProjectedModel(projection, model)


def add_pca(model: nn.Module, projection: PCAProjection) -> ProjectedModel:
    """``model`` with ``projection`` as its first layer, recorded so that checkpoints rebuild it."""
    wrapped = wrap_model(model, "pca", **projection.config())
    wrapped.projection.load_state_dict(projection.state_dict())
    return wrapped
