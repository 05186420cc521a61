"""Tests for netpress.models: shapes, fx traceability, parameter layout, pretrained loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

from netpress.errors import ArtefactError, ModelError
from netpress.models import (
    MODELS,
    PadShortcut,
    build_model,
    cifar_resnet,
    find_pretrained,
    load_pretrained_cifar_resnet,
    mobilenet_v1_cifar,
    mobilenet_v2_cifar,
    resnet20,
    resnet56,
    vgg_cifar,
)
from netpress.models.small import InvertedResidual

_INPUT_SHAPES = {"digits_cnn": (1, 8, 8), "mnist_cnn": (1, 28, 28)}


def _keys(model: nn.Module) -> list[str]:
    return [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_model_forward_and_fx_trace(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7).eval()
    x = torch.randn(2, *_INPUT_SHAPES.get(name, (3, 32, 32)))
    with torch.no_grad():
        y = model(x)
        traced = torch.fx.symbolic_trace(model)
        y_traced = traced(x)
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()
    assert torch.equal(y, y_traced)


def test_build_model_unknown_name_lists_known() -> None:
    with pytest.raises(ModelError, match="'nope'.*cifar_resnet20"):
        build_model("nope")


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        MODELS["x"] = resnet20  # type: ignore[index]


@pytest.mark.parametrize(
    ("depth", "keys", "params"),
    [(20, 97, 269_722), (32, 157, 464_154), (44, 217, 658_586), (56, 277, 853_018)],
)
def test_option_a_layout_matches_akamaster(depth: int, keys: int, params: int) -> None:
    model = cifar_resnet(depth)
    assert len(_keys(model)) == keys
    assert _n_params(model) == params
    assert not any("shortcut" in k for k in model.state_dict())


def test_resnet_aliases() -> None:
    assert _n_params(resnet20()) == 269_722
    assert _n_params(resnet56(num_classes=100)) == 853_018 + 64 * 90 + 90


def test_pad_shortcut_is_stateless_and_pads_channels() -> None:
    pad = PadShortcut(32)
    assert list(pad.parameters()) == [] and pad.state_dict() == {}
    x = torch.randn(2, 16, 8, 8)
    y = pad(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    graph = torch.fx.symbolic_trace(pad)
    assert torch.equal(graph(x), y)


def test_option_b_has_1x1_shortcut_convs() -> None:
    model = cifar_resnet(20, shortcut="B")
    convs = [m for n, m in model.named_modules() if "shortcut" in n and isinstance(m, nn.Conv2d)]
    assert len(convs) == 2
    assert all(c.kernel_size == (1, 1) and c.stride == (2, 2) for c in convs)
    assert not any(isinstance(m, PadShortcut) for m in model.modules())


@pytest.mark.parametrize("depth", [0, 9, 21])
def test_bad_depth_raises(depth: int) -> None:
    with pytest.raises(ModelError, match="6n\\+2"):
        cifar_resnet(depth)


def test_bad_shortcut_raises() -> None:
    with pytest.raises(ModelError, match="'C'"):
        cifar_resnet(20, shortcut="C")  # type: ignore[arg-type]


def test_mobilenet_v1_has_depthwise_convs() -> None:
    model = mobilenet_v1_cifar(width=0.5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups > 1]
    assert len(depthwise) == 13
    assert all(c.groups == c.in_channels == c.out_channels for c in depthwise)


def test_mobilenet_v2_has_residual_adds() -> None:
    model = mobilenet_v2_cifar()
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert sum(b.use_residual for b in blocks) == 10
    graph = torch.fx.symbolic_trace(model).graph
    adds = [n for n in graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 10


def test_vgg_width_and_batch_norm() -> None:
    slim = vgg_cifar("vgg11", width=0.25, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in slim.modules())
    assert _n_params(slim) < _n_params(vgg_cifar("vgg11")) / 10
    with pytest.raises(ModelError, match="vgg7"):
        vgg_cifar("vgg7")


def test_load_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(ArtefactError, match="does not exist"):
        load_pretrained_cifar_resnet(20, tmp_path / "missing.th")
    junk = tmp_path / "junk.th"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtefactError, match="junk.th"):
        load_pretrained_cifar_resnet(20, junk)
    wrong = tmp_path / "wrong.th"
    torch.save({"weights": {}}, wrong)
    with pytest.raises(ArtefactError, match="state_dict"):
        load_pretrained_cifar_resnet(20, wrong)
    with pytest.raises(ArtefactError, match="resnet20"):
        find_pretrained(20, tmp_path)


@pytest.mark.shared_data
@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_pretrained_loads_strictly(shared_data: Path, depth: int) -> None:
    path = find_pretrained(depth, shared_data)
    assert path.name.startswith(f"resnet{depth}-")
    model = load_pretrained_cifar_resnet(depth, path)
    assert not model.training
    torch.fx.symbolic_trace(model)


@pytest.mark.shared_data
def test_pretrained_wrong_depth_raises(shared_data: Path) -> None:
    with pytest.raises(ArtefactError, match="ResNet-32"):
        load_pretrained_cifar_resnet(32, find_pretrained(20, shared_data))


@pytest.mark.shared_data
def test_pretrained_resnet20_accuracy(shared_data: Path) -> None:
    from netpress.datasets import cifar10_exact_test

    model = load_pretrained_cifar_resnet(20, find_pretrained(20, shared_data))
    images, labels = cifar10_exact_test(shared_data).tensors
    with torch.no_grad():
        pred = model(images[:512]).argmax(1)
    accuracy = (pred == labels[:512]).float().mean().item()
    assert accuracy >= 0.90, f"resnet20 accuracy {accuracy:.4f} on 512 lossless test images"
