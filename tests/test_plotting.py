import pytest
import torch

from smoothcert.methods.fixed import FixedSigma
from smoothcert.methods.base import method_class
from smoothcert.evaluation.regions_plot import method_regions, plot_regions
from smoothcert.methods.base import RunContext
from smoothcert.geometry.regions import Ball, Ellipsoid

from conftest import Linear2


def test_regions_of_each_method_and_the_picture(tmp_path):
    model = Linear2(torch.tensor([1.0, -1.0]), 0.0)
    g = torch.Generator().manual_seed(0)
    inputs = torch.rand(50, 2, generator=g)
    labels = (inputs[:, 0] > inputs[:, 1]).long()
    methods = [FixedSigma(0.1), method_class("dds")(0.1, dds_steps=5, memory=False),
               method_class("ancer")(0.1, dds_steps=5, steps=5, memory=False)]
    ctx = RunContext(model, 2, 50, 500, 0.01, 500, torch.float32, 0, torch.device("cpu"), 2)
    x = torch.tensor([[0.8, 0.2], [0.2, 0.9]])
    fixed, dds, ancer = (method_regions(m, ctx, x, [0, 1]) for m in methods)
    assert all(isinstance(r, Ball) for r in fixed + dds) and all(isinstance(r, Ellipsoid) for r in ancer)
    out = plot_regions(model, inputs, labels, [0, 1, 2], methods, tmp_path / "r.png", num_classes=2, n0=50, n=500,
                       alpha=0.01)
    assert out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="memory off"):
        method_regions(method_class("dds")(0.1, memory=True), ctx, x, [0, 1])
    with pytest.raises(ValueError, match="2D"):
        plot_regions(model, torch.rand(5, 3), labels[:5], [0], methods, tmp_path / "x.png", num_classes=2)
