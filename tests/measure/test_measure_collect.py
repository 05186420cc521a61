"""collect_outputs / collect_pair: input conventions, labels, pairing and errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from netpress.errors import DataError, ModelError
from netpress.measure.collect import collect_outputs, collect_pair


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(a + b), a


class KeywordInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": x, "logits": self.fc(x) * scale}


def test_tensor_inputs_with_labels() -> None:
    model = _linear()
    xs = [torch.randn(3, 4, 4), torch.randn(2, 4, 4)]
    data = [(xs[0], torch.tensor([0, 1, 2])), (xs[1], torch.tensor([3, 0]))]
    out, labels = collect_outputs(model, data)
    assert out.shape == (5, 4) and out.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(out, model(torch.cat(xs)))
    assert labels is not None and labels.tolist() == [0, 1, 2, 3, 0]
    assert not out.is_inference()


def test_tuple_inputs_and_unlabeled_data() -> None:
    model = TwoInputs()
    data = [((torch.randn(2, 16), torch.randn(2, 16)), None) for _ in range(3)]
    out, labels = collect_outputs(model, data, max_batches=2)
    assert out.shape == (4, 4)  # the first tensor of the tuple output, 2 batches
    assert labels is None


def test_dict_inputs_and_logits_output() -> None:
    model = KeywordInputs()
    data = [({"x": torch.randn(2, 16), "scale": torch.tensor(2.0)}, [1, 0])]
    out, labels = collect_outputs(model, data, progress=True, description="dict inputs")
    assert out.shape == (2, 4)
    assert labels is not None and labels.tolist() == [1, 0]


def test_training_flags_are_restored() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Dropout(0.5))
    model.train()
    model[2].eval()
    collect_outputs(model, [(torch.randn(2, 16), None)])
    assert model.training and model[1].training and not model[2].training


def test_collect_pair_uses_the_same_batches_in_one_pass() -> None:
    model = _linear()

    def shuffled_once() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(3):  # a generator: can only be read once, and differs every time
            yield torch.randn(4, 16), torch.randint(0, 4, (4,))

    ref, cmp, labels = collect_pair(model, model, shuffled_once())
    assert torch.equal(ref, cmp)
    assert ref.shape == (12, 4) and labels is not None and labels.shape == (12,)


def test_empty_data_is_an_error() -> None:
    with pytest.raises(DataError, match="data yielded no batches"):
        collect_outputs(_linear(), [])


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([torch.randn(2, 16)], "data batch 0 is not an (inputs, labels) pair"),
        ([(torch.randn(2, 16), None), (torch.randn(2, 16), None, 1)], "data batch 1"),
        (42, "iterable of (inputs, labels) batches"),
    ],
)
def test_malformed_batches_are_named(data: Any, fragment: str) -> None:
    with pytest.raises(DataError) as info:
        collect_outputs(_linear(), data)
    assert fragment in str(info.value)


def test_shape_mismatch_says_data_does_not_fit() -> None:
    data = [(torch.randn(2, 10), None)]
    with pytest.raises(DataError) as info:
        collect_outputs(_linear(), data)
    message = str(info.value)
    assert "does not fit the model" in message
    assert "data batch 0" in message and "tensor[2, 10]" in message
    # the failing layer and what it expects, instead of torch's "mat1 and mat2 ..."
    assert "layer '1' (Linear) expects 16 features in the last dimension, got 10" in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_mixed_labels_and_max_batches_validation() -> None:
    data = [(torch.randn(2, 16), torch.tensor([0, 1])), (torch.randn(2, 16), None)]
    with pytest.raises(DataError, match="labels None while others have labels"):
        collect_outputs(_linear(), data)
    with pytest.raises(DataError, match="max_batches"):
        collect_outputs(_linear(), data, max_batches=0)


def test_model_on_another_device_is_reported() -> None:
    model = _linear().to("meta")
    with pytest.raises(ModelError, match="model is on meta"):
        collect_outputs(model, [(torch.randn(2, 16), None)])
