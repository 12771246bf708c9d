"""Models (normalization inside, registry, parameter counts) and checkpoints (round trip, clear failures)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.engine.smooth import certify
from smoothcert.models.checkpoint import load_checkpoint, save_checkpoint
from smoothcert.data.datasets import DATASETS, load_dataset
from smoothcert.models.architectures import (ARCHITECTURES, WRAPPERS, Normalize, build_model, cifar_resnet, default_arch, model_for_dataset, model_spec, register_wrapper, wrap_model)

torch.set_num_threads(1)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _resnet_params_by_hand(depth: int, classes: int = 10) -> int:
    """He et al.'s CIFAR ResNet with projection shortcuts, counted from the layer list (no torch)."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # stem conv + BN
    c_in = 16
    for c in (16, 32, 64):
        for b in range(n):
            total += 9 * c_in * c + 2 * c + 9 * c * c + 2 * c  # two conv3x3 + two BN
            if c_in != c:
                total += c_in * c + 2 * c  # 1x1 projection + BN
            c_in = c
    return total + 64 * classes + classes


def test_resnet_parameter_counts():
    n20, n110 = _count(build_model("resnet20")), _count(build_model("resnet110"))
    assert n20 == _resnet_params_by_hand(20) and n110 == _resnet_params_by_hand(110)
    assert 0.26e6 < n20 < 0.28e6 and 1.70e6 < n110 < 1.75e6  # "0.27M" and "1.7M" (He et al., table 6)
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(21)


def test_normalize_is_per_channel_and_checks_std():
    norm = Normalize([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])
    x = torch.rand(4, 3, 5, 5)
    expect = torch.stack([(x[:, c] - m) / s for c, (m, s) in enumerate(zip([0.1, 0.2, 0.3], [0.5, 0.25, 2.0]))], 1)
    torch.testing.assert_close(norm(x), expect)
    flat = Normalize([0.5, 0.0], [0.25, 1.0])
    torch.testing.assert_close(flat(torch.tensor([[1.0, 3.0]])), torch.tensor([[2.0, 3.0]]))
    assert norm(x.double()).dtype == torch.float64
    for bad_std in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="std"):
            Normalize(0.5, bad_std)
    with pytest.raises(ValueError, match="match"):
        Normalize([0.1, 0.2], [1.0, 1.0, 1.0])


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_default_models_give_one_score_per_class(dataset):
    info = DATASETS[dataset]
    model = model_for_dataset(dataset, arch="resnet20" if dataset == "cifar10" else None).eval()
    assert isinstance(model[0], Normalize)  # normalization lives inside the model
    assert model[0].mean.tolist() == pytest.approx(list(info.mean))
    with torch.no_grad():
        out = model(torch.rand(3, *info.input_shape))
    assert out.shape == (3, info.num_classes) and torch.isfinite(out).all()
    assert default_arch(dataset) in ARCHITECTURES


def test_build_model_errors_and_spec():
    with pytest.raises(ValueError, match="mlp, mnist-cnn, resnet110, resnet20"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="allowed: num_classes, input_shape"):
        build_model("mlp", depth=3)
    with pytest.raises(ValueError, match="unknown data set"):
        default_arch("imagenet")
    spec = model_spec(build_model("mlp", num_classes=3, hidden=[8]))
    assert spec == {"arch": "mlp", "wrappers": [], "arch_kwargs": {
        "num_classes": 3, "input_shape": [2], "hidden": [8], "mean": 0.5, "std": 0.25}}
    assert model_spec(nn.Linear(2, 2)) is None


def test_mnist_cnn_learns_mnist_in_one_epoch():
    torch.manual_seed(0)
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    model = model_for_dataset("mnist")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    order = torch.randperm(len(train))
    for i in range(0, len(train), 50):
        x, y = train.batch(order[i:i + 50])
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model.eval()(test.inputs).argmax(1) == test.labels).float().mean().item()
    assert accuracy > 0.85


def test_plain_modules_and_ours_work_as_base_classifiers():
    x = load_dataset("toy-curved", "test").inputs[:2]
    for model in (nn.Sequential(nn.Linear(2, 2)), model_for_dataset("toy-curved")):
        certs = certify(model.eval(), x, IsotropicGaussian(0.1), 2, n0=10, n=50, alpha=0.01, seed=0)
        assert len(certs) == 2


# ------------------------------------------------------------------------------------------------ checkpoints


def _trained_like(model: nn.Module, shape) -> nn.Module:
    """Move batch-norm running statistics away from their initial values, as training would."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(8, *shape))
    return model.eval()


@pytest.mark.parametrize("dataset, arch", [("toy-3class", "mlp"), ("digits", "mnist-cnn"), ("cifar10", "resnet20")])
def test_checkpoint_round_trip_gives_the_same_outputs(tmp_path, dataset, arch):
    torch.manual_seed(1)
    shape = DATASETS[dataset].input_shape
    model = _trained_like(model_for_dataset(dataset, arch=arch), shape)
    stem = save_checkpoint(tmp_path / "run" / "model", model,
                           {"dataset": dataset, "sigma": 0.25, "training": {"epochs": 3, "method": "gaussian"}})
    assert sorted(os.listdir(tmp_path / "run")) == ["model.json", "model.safetensors"]  # no temporary files left
    x = torch.rand(5, *shape)
    with torch.no_grad():
        expect = model(x)
    for path in (stem, stem + ".safetensors", stem + ".json"):
        loaded, config = load_checkpoint(path)
        assert not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(x), expect)
    assert config["arch"] == arch and config["dataset"] == dataset and config["sigma"] == 0.25
    assert config["num_classes"] == DATASETS[dataset].num_classes and config["input_shape"] == list(shape)
    assert config["training"] == {"epochs": 3, "method": "gaussian"} and "smoothcert_version" in config


def test_checkpoint_of_a_foreign_module_needs_an_arch(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="arch"):
        save_checkpoint(tmp_path / "m", model)
    with pytest.raises(ValueError, match="unknown architecture 'linear'"):
        save_checkpoint(tmp_path / "m", model, {"arch": "linear", "arch_kwargs": {}})
    assert not os.listdir(tmp_path)  # nothing written when the config is refused
    mlp = build_model("mlp", hidden=[4])
    state = {f"{k}": v for k, v in mlp.state_dict().items()}
    plain = nn.Sequential(Normalize(0.5, 0.25), nn.Flatten(), nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    plain.load_state_dict(state)
    save_checkpoint(tmp_path / "m", plain, {"arch": "mlp", "arch_kwargs": {"hidden": [4]}})
    loaded, config = load_checkpoint(tmp_path / "m")
    x = torch.rand(3, 2)
    assert torch.equal(loaded(x), plain(x)) and config["num_classes"] == 2


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(2)
    model = build_model("mlp", num_classes=3, hidden=[16, 16])
    return save_checkpoint(tmp_path / "mlp", model, {"dataset": "toy-3class"}), model


def test_corrupt_or_truncated_weights(saved):
    stem, _ = saved
    blob = open(stem + ".safetensors", "rb").read()
    for damaged in (blob[: len(blob) // 2], b"garbage" * 10, b""):
        with open(stem + ".safetensors", "wb") as f:
            f.write(damaged)
        with pytest.raises(ValueError, match="safetensors"):
            load_checkpoint(stem)


def test_missing_files_and_bad_configs(saved, tmp_path):
    stem, _ = saved
    with pytest.raises(ValueError, match="no checkpoint weights"):
        load_checkpoint(tmp_path / "nothing")
    config = json.load(open(stem + ".json"))

    def load_with(cfg_text):
        with open(stem + ".json", "w") as f:
            f.write(cfg_text)
        return load_checkpoint(stem)

    with pytest.raises(ValueError, match="not valid JSON"):
        load_with("{not json")
    with pytest.raises(ValueError, match="JSON object"):
        load_with("[1, 2]")
    with pytest.raises(ValueError, match="lacks arch_kwargs"):
        load_with(json.dumps({k: v for k, v in config.items() if k != "arch_kwargs"}))
    with pytest.raises(ValueError, match="unknown architecture 'mlp-9000'"):
        load_with(json.dumps({**config, "arch": "mlp-9000"}))
    with pytest.raises(ValueError, match=r"do not match.*wrong shape"):
        load_with(json.dumps({**config, "arch_kwargs": {**config["arch_kwargs"], "hidden": [16, 8]}}))
    with pytest.raises(ValueError, match=r"do not match.*unexpected"):
        load_with(json.dumps({**config, "arch_kwargs": {**config["arch_kwargs"], "hidden": [16]}}))
    os.remove(stem + ".json")
    with pytest.raises(ValueError, match="no checkpoint config"):
        load_checkpoint(stem)


def test_torch_state_dicts_load_only_as_weights(tmp_path, saved):
    stem, model = saved
    config = json.load(open(stem + ".json"))
    x = torch.rand(4, 2)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="weights only"):
        load_checkpoint(tmp_path / "w.pt")
    loaded, _ = load_checkpoint(tmp_path / "w.pt", config=config)
    assert torch.equal(loaded(x), model.eval()(x))
    json.dump(config, open(tmp_path / "w.json", "w"))  # a config beside the weights is found
    assert torch.equal(load_checkpoint(tmp_path / "w.pt")[0](x), model(x))
    torch.save(model, tmp_path / "whole.pth")  # a pickled module: refused, nothing unpickled
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(tmp_path / "whole.pth", config=config)


def test_cohen_style_checkpoint_loads(tmp_path):
    """Cohen et al. save {'arch', 'state_dict', 'optimizer', ...} of Sequential(NormalizeLayer, resnet),
    whose normalization has no buffers; ours fills in their CIFAR-10 mean and std."""
    torch.manual_seed(3)
    model = _trained_like(build_model("resnet20"), (3, 32, 32))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("0.")}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"epoch": 90, "arch": "cifar_resnet20", "state_dict": state, "optimizer": opt.state_dict()},
               tmp_path / "checkpoint.pth.tar")
    loaded, config = load_checkpoint(tmp_path / "checkpoint.pth.tar")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert config["arch"] == "resnet20" and config["dataset"] == "cifar10"


class _Affine(nn.Module):
    def __init__(self, model: nn.Module, dim: int):
        super().__init__()
        self.register_buffer("matrix", torch.eye(dim))
        self.model = model

    def forward(self, x):
        return self.model(x @ self.matrix.T)


def test_registered_wrappers_are_rebuilt_from_the_config(tmp_path):
    register_wrapper("test-affine")(lambda model, dim: _Affine(model, dim))
    try:
        torch.manual_seed(4)
        model = wrap_model(build_model("mlp", hidden=[8]), "test-affine", dim=2)
        with torch.no_grad():
            model.matrix.copy_(torch.tensor([[0.0, 1.0], [2.0, 0.5]]))  # learned state travels in the weights
        stem = save_checkpoint(tmp_path / "wrapped", model)
        loaded, config = load_checkpoint(stem)
        assert config["wrappers"] == [{"kind": "test-affine", "dim": 2}] and isinstance(loaded, _Affine)
        x = torch.rand(6, 2)
        assert torch.equal(loaded(x), model(x))
        with pytest.raises(ValueError, match="unknown wrapper kind 'no-such-kind'"):
            wrap_model(model, "no-such-kind")
    finally:
        WRAPPERS.pop("test-affine")
