"""The matrix view of layers: im2col columns times the weight matrix is the layer's output."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netpress.errors import ModelError
from netpress.reconstruct.layers import LayerView, supported


def _hf_conv1d(nx=6, nf=5):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.weight)
    return layer


CASES = {
    "linear": (lambda: nn.Linear(6, 5), (4, 3, 6)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), (2, 4, 7, 7)),
    "grouped": (lambda: nn.Conv2d(4, 6, (3, 2), padding=(1, 0), dilation=(2, 1), groups=2),
                (2, 4, 8, 6)),
    "depthwise": (lambda: nn.Conv2d(4, 8, 3, padding="same", groups=4), (2, 4, 5, 5)),
    "reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, groups=2,
                                 padding_mode="circular"), (2, 4, 9)),
    "hf_conv1d": (_hf_conv1d, (3, 4, 6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_columns_times_matrix_is_the_layer_output(case):
    make, shape = CASES[case]
    torch.manual_seed(1)
    layer = make()
    x = torch.randn(shape)
    view = LayerView(layer, case)
    cols = view.columns(x)
    w = view.matrix(torch.float32)
    groups, rows, d = view.shape
    assert cols.shape[0] == groups and cols.shape[2] == d and w.shape == (groups, rows, d)
    out = torch.cat([cols[g] @ w[g].T for g in range(groups)], dim=1)  # samples × out
    with torch.no_grad():
        ref = layer(x)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        ref = ref.movedim(1, -1).reshape(-1, ref.shape[1])
    else:
        ref = ref.reshape(-1, ref.shape[-1])
    ref = ref - layer.bias.detach()
    assert torch.allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_set_matrix_round_trips(case):
    layer = CASES[case][0]()
    view = LayerView(layer, case)
    w = view.matrix() * 2
    view.set_matrix(w)
    assert torch.equal(view.matrix(), w.float().double())
    assert torch.equal(view.matrix_layout(view.weight_layout(w)), w)


def test_unsupported_layers_are_refused_by_name():
    assert not supported(nn.ConvTranspose2d(2, 2, 3)) and not supported(nn.Embedding(3, 2))
    with pytest.raises(ModelError, match="'emb' is a Embedding"):
        LayerView(nn.Embedding(3, 2), "emb")


def test_linear_columns_flatten_all_leading_dims():
    view = LayerView(nn.Linear(3, 2), "fc")
    x = torch.randn(2, 5, 3)
    assert torch.equal(view.columns(x)[0], x.reshape(10, 3))
    assert F.linear(x, view.weight).shape == (2, 5, 2)
