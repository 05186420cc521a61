"""Leaf module specs (netpress.export.modules): rebuild torch.nn modules from JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from netpress.errors import ArtefactError, ModelError
from netpress.export.modules import (
    build_module,
    decode_value,
    encode_value,
    leaf_specs,
    module_spec,
    register_module_type,
)

EXAMPLES = [
    nn.Conv1d(3, 5, 3, stride=2, padding=1, bias=False),
    nn.Conv2d(4, 8, (3, 1), padding="same", dilation=(1, 2), groups=2, padding_mode="reflect"),
    nn.Conv3d(2, 2, 1),
    nn.ConvTranspose2d(4, 2, 3, stride=2, output_padding=1),
    nn.Linear(7, 3, bias=False),
    nn.Bilinear(3, 4, 5),
    nn.Embedding(11, 4, padding_idx=0, max_norm=2.0),
    nn.EmbeddingBag(11, 4, mode="max"),
    nn.BatchNorm1d(6, momentum=None),
    nn.BatchNorm2d(6, affine=False, track_running_stats=False),
    nn.LayerNorm((4, 5), eps=1e-3, elementwise_affine=True, bias=False),
    nn.GroupNorm(2, 6, affine=False),
    nn.InstanceNorm2d(3, affine=True),
    nn.LocalResponseNorm(3, alpha=0.1),
    nn.Dropout(0.3),
    nn.Dropout2d(0.1),
    nn.ReLU(inplace=True),
    nn.ReLU6(),
    nn.LeakyReLU(0.2),
    nn.PReLU(6, init=0.1),
    nn.ELU(alpha=0.5),
    nn.GELU(approximate="tanh"),
    nn.SiLU(),
    nn.Hardtanh(-2.0, 3.0),
    nn.Softmax(dim=-1),
    nn.LogSoftmax(dim=1),
    nn.Softplus(beta=2.0, threshold=10.0),
    nn.Identity(),
    nn.Flatten(1, -1),
    nn.Unflatten(1, (2, 3)),
    nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
    nn.AvgPool2d(2, count_include_pad=False, divisor_override=3),
    nn.AdaptiveAvgPool2d((1, None)),
    nn.AdaptiveMaxPool2d(2),
    nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
    nn.PixelShuffle(2),
    nn.ZeroPad2d((1, 0, 2, 0)),
    nn.ConstantPad2d(1, -math.inf),
    nn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=5),
]


def _fingerprint(m: nn.Module) -> tuple[object, ...]:
    return type(m), repr(m), {k: tuple(v.shape) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("module", EXAMPLES, ids=lambda m: type(m).__name__)
def test_spec_rebuilds_an_equivalent_module(module: nn.Module) -> None:
    spec = module_spec(module)
    assert spec is not None, f"{module!r} should be supported"
    spec = json.loads(json.dumps(spec, allow_nan=False))  # strict JSON on the way
    rebuilt = build_module(spec, device="cpu")
    assert _fingerprint(rebuilt) == _fingerprint(module)
    assert _fingerprint(build_module(spec)) == _fingerprint(module)


def test_specs_keep_tuples_and_strings() -> None:
    spec = module_spec(nn.Conv2d(4, 8, 3, padding="same"))
    assert spec is not None
    assert spec["type"] == "torch.nn.Conv2d"
    assert spec["kwargs"]["kernel_size"] == {"tuple": [3, 3]}
    assert spec["kwargs"]["padding"] == "same" and spec["kwargs"]["bias"] is True


class Scale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class MyLinear(nn.Linear):
    pass


class Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))


def test_unsupported_modules_have_no_spec() -> None:
    assert module_spec(Opaque()) is None  # user class
    assert module_spec(MyLinear(2, 2)) is None  # subclasses are not trusted
    pruned = nn.Linear(4, 4)
    prune.random_unstructured(pruned, "weight", 0.5)  # weight_orig + mask
    assert module_spec(pruned) is None


def test_registered_type_round_trips() -> None:
    register_module_type(Scale, lambda m: {"n": m.n}, Scale, name="tests.export.Scale")
    register_module_type(Scale, lambda m: {"n": m.n}, Scale, name="tests.export.Scale")  # again
    spec = module_spec(Scale(5))
    assert spec == {"type": "tests.export.Scale", "kwargs": {"n": 5}}
    assert isinstance(build_module(spec), Scale)
    with pytest.raises(ValueError, match="taken"):
        register_module_type(MyLinear, lambda m: {}, MyLinear, name="torch.nn.Linear")


def test_build_rejects_unknown_types_and_bad_kwargs() -> None:
    with pytest.raises(ArtefactError, match="os.system"):
        build_module({"type": "os.system", "kwargs": {}})
    with pytest.raises(ArtefactError, match="torch.nn.Linear"):
        build_module({"type": "torch.nn.Linear", "kwargs": {"in_features": 2, "bogus": 1}})
    with pytest.raises(ArtefactError, match="malformed"):
        build_module({"type": 3})


def test_leaf_specs_cover_nested_standard_modules() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.ReLU(), Opaque()), nn.Flatten())
    specs = leaf_specs(model)
    assert set(specs) == {"0", "1.0", "2"}


VALUES = [None, True, 3, -0.0, 1.5, math.inf, -math.inf, "s", (1, (2, [3])), [], (),
          {"a": (1, 2)}, slice(None, 4, 2), Ellipsis, torch.float16, torch.device("cpu"),
          torch.channels_last, torch.Size([2, 3]), torch.strided]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_values_round_trip_through_strict_json(value: object) -> None:
    text = json.dumps(encode_value(value), allow_nan=False)
    back = decode_value(json.loads(text))
    assert type(back) is type(value) and repr(back) == repr(value)


def test_nan_and_unencodable_values() -> None:
    assert math.isnan(decode_value(json.loads(json.dumps(encode_value(math.nan)))))
    with pytest.raises(ModelError, match="object"):
        encode_value(object())
    with pytest.raises(ArtefactError):
        decode_value({"dtype": "not_a_dtype"})
    with pytest.raises(ArtefactError):
        decode_value({"import": "os"})
