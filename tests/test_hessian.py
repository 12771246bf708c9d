import pytest
import torch
from torch import nn

from smoothcert.methods.hessian import hessian_basis, hessian_method, is_piecewise_linear, loss_hessian


def relu_net(d=6, k=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, k))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 9, 5))


class Wrapped(nn.Module):
    """A model with a forward of its own (unknown to the module-type check)."""

    def __init__(self, inner, smooth):
        super().__init__()
        self.inner, self.smooth = inner, smooth

    def forward(self, x):
        z = self.inner(x)
        return torch.tanh(z) * 3 if self.smooth else z


def reference_hessian(model, x):
    """Per-input Hessian of CE(f(x), argmax f(x)) by torch.autograd.functional.hessian in float64."""
    out = []
    for xi in x:
        label = model(xi[None]).argmax(1)
        f = lambda v: nn.functional.cross_entropy(model.double()(v.reshape(1, *xi.shape)), label)  # noqa: E731
        out.append(torch.autograd.functional.hessian(f, xi.double().reshape(-1)))
        model.float()
    return torch.stack(out)


def test_jacobian_form_equals_double_differentiation_on_relu_networks():
    for model, x in [(relu_net(), torch.rand(5, 6)), (cnn(), torch.rand(3, 1, 6, 6))]:
        assert is_piecewise_linear(model) and hessian_method(model, x) == "jacobian"
        jac, form = loss_hessian(model, x, "jacobian")
        dbl, _ = loss_hessian(model, x, "double")
        ref = reference_hessian(model, x)
        assert form == "jacobian" and jac.shape == ref.shape == dbl.shape
        assert torch.allclose(dbl, ref, atol=1e-5)
        assert torch.allclose(jac, ref, atol=1e-5), (jac - ref).abs().max()
        assert ref.abs().max() > 1e-3  # not trivially zero


def test_auto_picks_double_for_smooth_networks_and_probes_custom_modules():
    torch.manual_seed(1)
    smooth = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.rand(4, 5)
    assert not is_piecewise_linear(smooth) and hessian_method(smooth, x) == "double"
    hess, form = loss_hessian(smooth, x)
    assert form == "double"
    assert torch.allclose(hess, reference_hessian(smooth, x), atol=1e-5)
    # here the Jacobian form misses the second-order term
    jac, _ = loss_hessian(smooth, x, "jacobian")
    assert (jac - hess).abs().max() > 1e-4
    softplus = nn.Sequential(nn.Linear(5, 8), nn.Softplus(), nn.Linear(8, 3))
    assert hessian_method(softplus, x) == "double"
    # a custom forward: probed numerically
    assert hessian_method(Wrapped(relu_net(5, 3), smooth=False), x) == "jacobian"
    assert hessian_method(Wrapped(relu_net(5, 3), smooth=True), x) == "double"


def test_basis_is_orthonormal_eigenvectors_and_non_finite_falls_back_to_identity():
    model, x = relu_net(), torch.rand(3, 6)
    basis, values, finite, _ = hessian_basis(model, x)
    hess, _ = loss_hessian(model, x)
    eye = torch.eye(6, dtype=torch.float64)
    assert finite.all()
    assert torch.allclose(basis.transpose(1, 2) @ basis, eye.expand(3, 6, 6), atol=1e-10)
    assert torch.allclose(hess @ basis, basis * values[:, None, :], atol=1e-10)

    class Exploding(nn.Module):
        def forward(self, v):
            scale = torch.where(v[:, :1] > 0.5, float("inf"), 1.0).detach()
            return model(v) * scale

    x2 = torch.tensor([[0.9] + [0.1] * 5, [0.1] * 6])
    basis, _, finite, _ = hessian_basis(Exploding(), x2, "jacobian")
    assert finite.tolist() == [False, True]
    assert torch.equal(basis[0], eye)


def test_bad_input():
    with pytest.raises(ValueError, match="method"):
        loss_hessian(relu_net(), torch.rand(2, 6), "newton")
    with pytest.raises(ValueError, match="differentiabl"):
        loss_hessian(lambda v: torch.nn.functional.one_hot(v.sum(1).long() % 3, 3).float(), torch.rand(2, 6))
