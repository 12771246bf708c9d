"""Hessian of the classification loss with respect to the input, and its eigenvector basis (RANCER).

RANCER (seed 000 chapter 4, section 4.2, Algorithm 2) rotates the smoothing noise into the eigenvectors ``U`` of
``H = d^2 L / dx^2`` (eq. 4.7), the Hessian of the cross-entropy loss ``L(x) = -log softmax(f(x))_y`` of the
base classifier's logits ``f`` at the input, with ``y`` the base classifier's own prediction at ``x`` (no label
is used). By the chain rule

    H = J^T (diag(p) - p p^T) J + sum_k (p_k - [k = y]) d^2 f_k / dx^2,

with ``J = df/dx`` (K x d) and ``p = softmax(f(x))``. For a network that is piecewise linear in ``x`` (ReLU,
max-pool, linear and convolution layers) the second term vanishes wherever the Hessian exists (away from the
kinks), so ``H = J^T (diag(p) - p p^T) J`` exactly: K backward passes instead of d. Otherwise the Hessian is
computed by differentiating twice.

:func:`loss_hessian` chooses between the two forms automatically (``"auto"``): the Jacobian form when every
module of the model is of a known piecewise-linear type, or, for any other model, when a probe finds the
second-order term exactly zero at the inputs (one Hessian-vector product through autograd; autograd's second
derivative of ReLU and max-pool is exactly zero); double differentiation otherwise. ``"jacobian"`` or
``"double"`` force a form. Everything is batched over inputs.

For large inputs (low-rank RANCER / RDDRS) :func:`top_eigenvectors` finds the k eigenpairs of largest ``|lambda|``
from Hessian-vector products alone (randomized subspace iteration, Halko, Martinsson and Tropp 2011, Alg. 4.4, then
Rayleigh-Ritz), never forming the d x d matrix. Its products differentiate twice; for a piecewise-linear network
autograd's second derivative of ReLU and max-pool is zero, so they are the Jacobian form's ``J^T (diag(p) - p p^T) J v``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["PIECEWISE_LINEAR_MODULES", "is_piecewise_linear", "hessian_method", "loss_hessian", "hessian_basis",
           "hvp_operator", "top_eigenvectors"]

#: Module types whose forward is piecewise linear in its input (in evaluation mode for batch norm / dropout).
PIECEWISE_LINEAR_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Identity, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
    nn.ConvTranspose2d, nn.ConvTranspose3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Hardtanh, nn.MaxPool1d,
    nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten,
    nn.Unflatten, nn.Dropout, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ZeroPad2d, nn.ConstantPad2d,
    nn.Sequential,
)

METHODS = ("auto", "jacobian", "double")


def is_piecewise_linear(model: Callable) -> bool:
    """True when every module of ``model`` (itself included) is of a type in :data:`PIECEWISE_LINEAR_MODULES`
    (or a subclass of ``nn.Sequential`` that keeps its forward).

    A module with a forward of its own (any other class) may apply a smooth function, so it does not count;
    :func:`hessian_method` then probes numerically.
    """
    if not isinstance(model, nn.Module):
        return False

    def known(m: nn.Module) -> bool:
        return type(m) in PIECEWISE_LINEAR_MODULES or (
            isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward)

    return all(known(m) for m in model.modules())


def _logits(model: Callable, x: torch.Tensor, create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    xg = x.detach().to(torch.float32).requires_grad_(True)
    with torch.enable_grad():
        z = model(xg)
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[0] != x.shape[0]:
        raise ValueError(f"the base classifier must return logits of shape (B, K); got "
                         f"{getattr(z, 'shape', type(z).__name__)}")
    if not z.requires_grad:
        raise ValueError("the base classifier's output does not depend differentiably on its input; "
                         "a Hessian needs a differentiable model")
    return xg, z


def hessian_method(model: Callable, x: torch.Tensor, method: str = "auto") -> str:
    """``"jacobian"`` or ``"double"``: the form :func:`loss_hessian` uses for ``model`` at ``x``.

    ``"auto"``: the Jacobian form if :func:`is_piecewise_linear`, else if a Hessian-vector product of the
    logits (random class weights, random direction) is exactly zero at every input; double differentiation
    otherwise.
    """
    if method not in METHODS:
        raise ValueError(f"hessian method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "auto":
        return method
    if is_piecewise_linear(model):
        return "jacobian"
    gen = torch.Generator(device=x.device).manual_seed(0)
    xg, z = _logits(model, x)
    weights = torch.randn(z.shape, generator=gen, device=z.device, dtype=z.dtype)
    with torch.enable_grad():
        (g,) = torch.autograd.grad((z * weights).sum(), xg, create_graph=True)
        direction = torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype)
        if not g.requires_grad:
            return "jacobian"
        (hv,) = torch.autograd.grad((g * direction).sum(), xg, allow_unused=True)
    return "jacobian" if hv is None or bool((hv == 0).all()) else "double"


def _jacobian_form(model: Callable, x: torch.Tensor) -> torch.Tensor:
    """``J^T (diag(p) - p p^T) J`` per input; K backward passes over the whole batch."""
    xg, z = _logits(model, x)
    b, k = z.shape
    rows = []
    for c in range(k):
        (gc,) = torch.autograd.grad(z[:, c].sum(), xg, retain_graph=c < k - 1)
        rows.append(gc.reshape(b, -1))
    jac = torch.stack(rows, dim=1).to(torch.float64)  # (B, K, d)
    p = torch.softmax(z.detach().to(torch.float64), dim=1)
    middle = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (B, K, K)
    return jac.transpose(1, 2) @ middle @ jac


def _double(model: Callable, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Exact Hessian of the loss by differentiating the gradient again (``d`` batched backward passes)."""
    xg, z = _logits(model, x)
    b = z.shape[0]
    labels = z.detach().argmax(dim=1)
    with torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(z, labels, reduction="sum")
        (g,) = torch.autograd.grad(loss, xg, create_graph=True)
    g = g.reshape(b, -1)
    d = g.shape[1]
    if not g.requires_grad:  # piecewise constant gradient: the Hessian is zero
        return torch.zeros((b, d, d), dtype=torch.float64, device=x.device)
    blocks = []
    for start in range(0, d, chunk):
        stop = min(d, start + chunk)
        eye = torch.zeros((stop - start, b, d), dtype=g.dtype, device=g.device)
        eye[torch.arange(stop - start), :, torch.arange(start, stop)] = 1.0
        try:
            (rows,) = torch.autograd.grad(g, xg, grad_outputs=eye, retain_graph=True, is_grads_batched=True,
                                          allow_unused=True)
        except RuntimeError:  # an operation without a batching rule: one backward pass per coordinate
            parts = [torch.autograd.grad(g, xg, grad_outputs=e, retain_graph=True, allow_unused=True)[0] for e in eye]
            rows = None if parts[0] is None else torch.stack(parts)
        if rows is None:
            rows = torch.zeros((stop - start, *xg.shape), dtype=g.dtype, device=g.device)
        blocks.append(rows.reshape(stop - start, b, d))
    hess = torch.cat(blocks, dim=0).permute(1, 0, 2).to(torch.float64)
    return 0.5 * (hess + hess.transpose(1, 2))


def loss_hessian(model: Callable, x: torch.Tensor, method: str = "auto") -> tuple[torch.Tensor, str]:
    """Hessian of the cross-entropy loss at each input w.r.t. the input: ``((B, d, d) float64, form used)``.

    The loss uses the base classifier's prediction at ``x`` as the label. ``method``: ``"auto"`` (see
    :func:`hessian_method`), ``"jacobian"`` (``J^T (diag(p) - p p^T) J``, exact for piecewise-linear networks)
    or ``"double"`` (double differentiation, exact for any twice-differentiable network). Entries may be
    non-finite if the model's derivatives are; :func:`hessian_basis` handles that.
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError("x must be a batch tensor (B, *input_shape)")
    form = hessian_method(model, x, method)
    hess = _jacobian_form(model, x) if form == "jacobian" else _double(model, x)
    return hess, form


def hessian_basis(model: Callable, x: torch.Tensor, method: str = "auto"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Eigenvectors of the loss Hessian at each input (seed 000 section 4.2): ``(U, eigenvalues, finite, form)``.

    ``U`` is (B, d, d) float64 with orthonormal columns (eigenvalues ascending). Where the Hessian of an input
    has a non-finite entry (``finite[i]`` False) that input gets the identity basis: RANCER then reduces to
    ANCER's axis-aligned noise for it, which is still a valid (only less tailored) smoothing distribution.
    """
    hess, form = loss_hessian(model, x, method)
    finite = torch.isfinite(hess).flatten(1).all(dim=1)
    eye = torch.eye(hess.shape[1], dtype=hess.dtype, device=hess.device).expand_as(hess)
    hess = torch.where(finite[:, None, None], 0.5 * (hess + hess.transpose(1, 2)), eye)
    eigenvalues, basis = torch.linalg.eigh(hess)
    basis = torch.where(finite[:, None, None], basis, eye)
    return basis, eigenvalues, finite, form


def hvp_operator(model: Callable, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V (B, p, d) -> H V`` for the Hessian of the cross-entropy loss at each input (label: the prediction at x).

    One graph of the gradient is built once; each call back-propagates the ``p`` vectors together
    (``is_grads_batched``). float64 out.
    """
    xg = x.detach().to(torch.float32).requires_grad_(True)
    with torch.enable_grad():
        z = model(xg)
        labels = z.detach().argmax(dim=1)
        loss = torch.nn.functional.cross_entropy(z, labels, reduction="sum")
        (g,) = torch.autograd.grad(loss, xg, create_graph=True)
    b = x.shape[0]
    g = g.reshape(b, -1)

    def apply(v: torch.Tensor) -> torch.Tensor:
        if not g.requires_grad:  # a piecewise-constant gradient: H = 0
            return torch.zeros_like(v, dtype=torch.float64)
        out = v.to(torch.float32).transpose(0, 1).contiguous()  # (p, B, d)
        try:
            (hv,) = torch.autograd.grad(g, xg, grad_outputs=out, retain_graph=True, is_grads_batched=True,
                                        allow_unused=True)
        except RuntimeError:  # an operation without a batching rule: one backward pass per vector
            parts = [torch.autograd.grad(g, xg, grad_outputs=o, retain_graph=True, allow_unused=True)[0] for o in out]
            hv = None if parts[0] is None else torch.stack(parts)
        if hv is None:
            return torch.zeros_like(v, dtype=torch.float64)
        return hv.reshape(out.shape).transpose(0, 1).to(torch.float64)

    return apply


def top_eigenvectors(model: Callable, x: torch.Tensor, k: int, *, generators: Sequence[torch.Generator],
                     iters: int = 3, oversample: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q (B, d, k), eigenvalues (B, k), finite (B,))``: the loss Hessian's k eigenpairs of largest ``|lambda|``.

    Randomized subspace iteration from a Gaussian start of ``k + oversample`` columns (input ``i``'s from
    ``generators[i]``, so it does not depend on the batch), ``iters`` products
    with re-orthonormalization (QR), then the Ritz pairs of ``Q^T H Q`` sorted by ``|lambda|`` (descending). ``Q``
    has orthonormal columns (float64). An input whose products are not finite gets the first k coordinate axes
    (``finite`` False): a valid, less tailored noise.
    """
    b = x.shape[0]
    d = int(x[0].numel())
    p = min(d, k + oversample)
    apply = hvp_operator(model, x)
    basis = torch.stack([torch.randn((d, p), generator=g, dtype=torch.float64, device=g.device) for g in generators]).to(x.device)
    basis = torch.linalg.qr(basis).Q
    for _ in range(iters):
        basis = torch.linalg.qr(apply(basis.transpose(1, 2)).transpose(1, 2)).Q
    hq = apply(basis.transpose(1, 2)).transpose(1, 2)  # (B, d, p)
    small = basis.transpose(1, 2) @ hq
    finite = torch.isfinite(small).flatten(1).all(dim=1) & torch.isfinite(basis).flatten(1).all(dim=1)
    small = torch.where(finite[:, None, None], 0.5 * (small + small.transpose(1, 2)), torch.zeros_like(small))
    values, vectors = torch.linalg.eigh(small)
    order = values.abs().argsort(dim=1, descending=True, stable=True)[:, :k]
    values = values.gather(1, order)
    q = basis @ vectors.gather(2, order[:, None, :].expand(b, p, k))
    q = torch.linalg.qr(q).Q  # orthonormal to float64 precision
    axes = torch.eye(d, k, dtype=torch.float64, device=x.device).expand(b, d, k)
    return torch.where(finite[:, None, None], q, axes), torch.where(finite[:, None], values, 0.0), finite
