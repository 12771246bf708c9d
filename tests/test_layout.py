"""Channels-last layout (``ChannelsLast``, ``certify --channels-last``): the same classifier, NHWC-strided."""

from __future__ import annotations

import json

import torch

from smoothcert.cli import demo
from smoothcert.cli.main import main
from smoothcert.models.layout import ChannelsLast


def conv_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 12 * 12, 10)).eval()


def test_wrapped_model_sees_channels_last_inputs_and_computes_the_same_function():
    plain, wrapped = conv_net(), ChannelsLast(conv_net())
    seen = {}
    for name, net in (("plain", plain), ("wrapped", wrapped)):
        first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        def probe(module, args, name=name):
            seen.setdefault(name, args[0].is_contiguous(memory_format=torch.channels_last))

        first.register_forward_pre_hook(probe)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in wrapped.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # a plain NCHW batch
    with torch.no_grad():
        a, b = plain(x), wrapped(x)
    assert seen == {"plain": False, "wrapped": True}
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.argmax(1), b.argmax(1))
    flat = torch.rand(5, 7)  # not an image batch: passed through as given
    lin = ChannelsLast(torch.nn.Linear(7, 2))
    assert torch.equal(lin(flat), lin.model(flat))


def test_certify_with_channels_last_gives_the_same_certificates_and_records_the_layout(tmp_path):
    path, _ = demo.shipped_weights()
    rows = {}
    for name, extra in (("plain", []), ("nhwc", ["--channels-last"])):
        out = tmp_path / f"{name}.tsv"
        assert main(["certify", "--checkpoint", str(path), "--dataset", "mnist", "--split", "test", "--n0", "50",
                     "--n", "500", "--alpha", "0.01", "--batch-size", "250", "--max", "6", "--seed", "1",
                     "--out", str(out), "--no-progress"] + extra) == 0
        lines = [line.split("\t") for line in out.read_text().splitlines()]
        head = lines[0]
        rows[name] = [{k: v for k, v in zip(head, r) if k != "time"} for r in lines[1:]]
        sidecar = json.loads((tmp_path / f"{name}.tsv.json").read_text())
        assert sidecar.get("channels_last", False) is bool(extra)
    assert rows["plain"] == rows["nhwc"] and len(rows["plain"]) == 6
