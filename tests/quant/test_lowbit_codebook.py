"""Weight-only low-bit and codebook quantization: accuracy, packed bytes, contract."""

import pytest
import torch

import netpress as npr
from netpress.errors import RecipeError
from netpress.export import dumps_artefact, load_artefact, read_header
from netpress.quant import Codebook, Quantize, WeightOnly
from netpress.quant.codebook import CodebookConv2d, kmeans_1d
from netpress.quant.modules import QuantConv2d
from netpress.quant.primitives import sqnr
from netpress.testing import TinyCNN, check_method_contract, toy_batches, toy_models


def test_kmeans_finds_clusters_and_keeps_zero():
    v = torch.cat([torch.full((50,), -2.0), torch.full((30,), 0.5), torch.full((20,), 3.0)])
    centroids, idx = kmeans_1d(v + 0.01 * torch.randn(100), 3)
    torch.testing.assert_close(centroids, torch.tensor([-2.0, 0.5, 3.0]), atol=0.01, rtol=0)
    assert idx.shape == v.shape and idx[:50].unique().tolist() == [0]
    pruned = torch.randn(1000) * (torch.rand(1000) > 0.5)
    c, i = kmeans_1d(pruned, 4, keep_zero=True)
    assert 0.0 in c.tolist()
    assert bool((c[i][pruned == 0] == 0).all())


@pytest.fixture(scope="module")
def wide_cnn():
    torch.manual_seed(0)
    model = TinyCNN(width=32).eval()
    data = toy_batches(32, 32, model=model)
    return model, data


def _size_and_sqnr(model, cfg, data):
    q = npr.compress(model, cfg, calibration=data, measure=False).model
    blob = dumps_artefact(q)
    x = data[0][0]
    with torch.no_grad():
        assert torch.equal(load_artefact(blob).model(x), q(x))
        return q, len(blob), read_header(blob)["payload_raw_bytes"], sqnr(model(x), q(x))


def test_low_bit_bytes_really_shrink(wide_cnn):
    model, data = wide_cnn
    _, int8_bytes, int8_raw, _ = _size_and_sqnr(model, Quantize(activations=None), data)
    q4, w4_bytes, w4_raw, db4 = _size_and_sqnr(model, WeightOnly(bits=4), data)
    _, w2_bytes, w2_raw, _ = _size_and_sqnr(model, WeightOnly(bits=2), data)
    assert isinstance(q4.conv2, QuantConv2d) and q4.conv2.bits == 4
    assert w4_raw < 0.6 * int8_raw and w2_raw < 0.4 * int8_raw  # packed, before zstd
    assert w4_bytes < 0.6 * int8_bytes and w2_bytes < w4_bytes
    assert db4 > 18


def test_codebook_size_and_accuracy(wide_cnn):
    model, data = wide_cnn
    float_bytes = len(dumps_artefact(model))
    q, cb_bytes, _, db = _size_and_sqnr(model, Codebook(bits=4), data)
    assert isinstance(q.conv2, CodebookConv2d) and q.conv2.codebook.numel() == 16
    assert cb_bytes < 0.2 * float_bytes
    assert db > 15


def test_per_layer_bits_and_validation(wide_cnn):
    model, data = wide_cnn
    q = npr.compress(model, Codebook(bits=4, per_layer={"fc": 2}), measure=False).model
    assert q.fc.bits == 2 and int(q.fc.indices.max()) <= 3
    q = npr.compress(model, WeightOnly(bits=3, per_layer={"re:conv.*": 8}), measure=False).model
    assert q.conv1.bits == 8 and q.fc.bits == 3
    with pytest.raises(RecipeError, match="bits"):
        Codebook(bits=0)
    with pytest.raises(RecipeError, match="bits"):
        WeightOnly(bits=1)


@pytest.mark.parametrize("name", list(toy_models()))
@pytest.mark.parametrize("cfg", [WeightOnly(bits=3), Codebook(bits=4)], ids=["w3", "cb4"])
def test_contract(cfg, name):
    model = toy_models()[name]
    check_method_contract(cfg, model, toy_batches(model=model))


def test_codebook_keeps_pruned_zeros_with_keep_zero():
    model = toy_models()["TinyCNN"]
    data = toy_batches(32, 16, model=model)
    recipe = [npr.GlobalMagnitudePrune(sparsity=0.6, floor=0.1), Codebook(bits=3, keep_zero=True)]
    q = npr.compress(model, recipe, measure=False).model
    weights = q.conv2.decoded_weight()
    assert float((weights == 0).float().mean()) >= 0.5
    assert q.conv2.channel_scale.shape == (q.conv2.out_channels,)
    with torch.no_grad():
        assert torch.isfinite(q(data[0][0])).all()
