"""SparseGPT, Wanda and GPTQ as netpress methods, on toy models and the real ResNet-20."""

import io

import pytest
import torch
from torch import nn

import netpress as npr
from netpress.errors import ModelError, RecipeError
from netpress.export import dumps_artefact, load_artefact
from netpress.reconstruct import GroupQuantConv, GroupQuantLinear, gptq_round
from netpress.reconstruct.patterns import holds_nm
from netpress.testing import TinyCNN, toy_batches, varied_teacher


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _agreement(a, b, data):
    with torch.no_grad():
        return float(torch.cat([(a(x).argmax(1) == b(x).argmax(1)).float() for x, _ in data])
                     .mean())


def _teacher_data():
    """The varied TinyMLP teacher and correlated inputs (pixels share a few factors)."""
    teacher = varied_teacher()
    mix = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))

    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(256, 8, generator=g) @ mix + 0.3 * torch.randn(256, 64, generator=g))
        x = x.reshape(256, 1, 8, 8)
        return [(x[i:i + 64], None) for i in range(0, 256, 64)]

    return teacher, batches(0), batches(1)


def _mse(a, b, data):
    with torch.no_grad():
        return float(torch.cat([(a(x) - b(x)).pow(2).flatten() for x, _ in data]).mean())


def test_sparsegpt_fits_outputs_better_than_magnitude_and_masks_survive_recovery():
    teacher, calib, held = _teacher_data()
    train = [(x, teacher(x).argmax(1).detach()) for x, _ in calib]
    sgpt = npr.compress(teacher, [npr.SparseGPT(sparsity=0.8), npr.FineTune(max_steps=3)],
                        calibration=calib, train=train, measure=False)
    alone = npr.compress(teacher, npr.SparseGPT(sparsity=0.8), calibration=calib,
                         measure=False)
    mag = npr.compress(teacher, npr.GlobalMagnitudePrune(sparsity=0.8, floor=0.0),
                       measure=False)
    step = sgpt.report["steps"][0]
    assert step["step"] == "SparseGPT" and step["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert step["seconds"] >= 0 and step["peak_rss_mb"] > 0 and step["layer_groups"] == 2
    for name in ("fc1", "fc2"):  # FineTune kept the zeros SparseGPT chose
        assert step["per_layer_sparsity"][name] == pytest.approx(0.8, abs=0.01)
        w = sgpt.model.get_submodule(name).weight
        assert float((w == 0).float().mean()) >= 0.79
    assert _mse(teacher, alone.model, held) < 0.7 * _mse(teacher, mag.model, held)
    assert _agreement(teacher, alone.model, held) > _agreement(teacher, mag.model, held)


def test_global_allocation_follows_magnitude_with_its_floor():
    teacher, calib, _ = _teacher_data()
    res = npr.compress(teacher, npr.SparseGPT(sparsity=0.6, allocation="global", floor=0.3),
                       calibration=calib, measure=False)
    per_layer = res.report["steps"][0]["per_layer_sparsity"]
    assert max(per_layer.values()) <= 0.7 + 1e-6  # floor: every layer keeps 30%
    assert res.report["steps"][0]["sparsity"] == pytest.approx(0.6, abs=1e-4)


@pytest.mark.parametrize("method", ["SparseGPT", "Wanda"])
def test_two_four_holds_exactly_and_odd_layers_stay_dense(method):
    torch.manual_seed(0)
    model = TinyCNN(width=8).eval()
    data = toy_batches(n=64, batch=32, model=model)
    cfg = getattr(npr, method)(pattern="2:4")
    res = npr.compress(model, cfg, calibration=data, measure=False)
    assert holds_nm(res.model.conv2.weight.reshape(16, -1), 2, 4)
    assert holds_nm(res.model.fc.weight, 2, 4)
    assert torch.equal(res.model.conv1.weight, model.conv1.weight)  # 9 inputs: left dense
    assert "conv1" in res.report["steps"][0]["left_dense"]
    loaded = load_artefact(dumps_artefact(res.model))
    assert loaded.header["tensors"]["conv2.weight"]["encoding"] == "nm_sparse"
    assert torch.equal(loaded.model.conv2.weight, res.model.conv2.weight)


def test_wanda_magnitude_needs_no_data():
    model = varied_teacher()
    res = npr.compress(model, npr.Wanda(sparsity=0.5, score="magnitude"), measure=False)
    w = res.model.fc1.weight
    assert torch.equal((w == 0).sum(1), torch.full((64,), 32))  # per output row


def test_gptq_layers_pack_codes_and_reload_bit_exact():
    teacher, calib, held = _teacher_data()
    gptq = npr.compress(teacher, npr.GPTQ(bits=4, group_size=16), calibration=calib,
                        measure=False)
    rtn = npr.compress(teacher, npr.GPTQ(bits=4, group_size=16, rounding="nearest"),
                       measure=False)
    fc1 = gptq.model.fc1
    assert isinstance(fc1, GroupQuantLinear) and fc1.weight_q.dtype == torch.uint8
    assert fc1.weight_scale.shape == (64, 4) and int(fc1.weight_q.max()) <= 15
    buf = dumps_artefact(gptq.model)
    loaded = load_artefact(buf).model
    x = held[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), gptq.model(x))
    assert len(buf) < 0.3 * len(dumps_artefact(teacher))  # 4-bit codes, packed
    assert _mse(teacher, gptq.model, held) < 0.8 * _mse(teacher, rtn.model, held)
    assert gptq.report["steps"][0]["peak_rss_mb"] > 0


def test_gptq_on_a_pruned_model_keeps_its_zeros_and_covers_convs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Flatten(),
                          nn.Linear(8 * 16, 4)).eval()
    data = [(torch.randn(16, 2, 4, 4), None) for _ in range(2)]
    res = npr.compress(model, [npr.SparseGPT(sparsity=0.5), npr.GPTQ(bits=3, symmetric=True)],
                       calibration=data, measure=False)
    conv = res.model[2]
    assert isinstance(conv, GroupQuantConv) and conv.weight_q.dtype == torch.int8
    assert int(conv.weight_q.abs().max()) <= 3
    assert float((conv.weight_q == 0).float().mean()) >= 0.5  # the pruned half stayed 0
    loaded = load_artefact(dumps_artefact(res.model, example_inputs=data[0][0])).model
    with torch.no_grad():
        assert torch.equal(loaded(data[0][0]), res.model(data[0][0]))


def test_gptq_round_for_fixed_int8_grids_beats_round_to_nearest():
    from netpress.quant.ptq import weight_scale
    from netpress.reconstruct.layers import LayerView

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    # correlated inputs: 8 channels mixed from 2 factors, plus a little noise
    x = torch.einsum("nfhw,fc->nchw", torch.randn(32, 2, 6, 6), torch.randn(2, 8)) \
        + 0.1 * torch.randn(32, 8, 6, 6)
    view = LayerView(conv)
    cols = view.columns(x)[0].double()
    h = cols.T @ cols / cols.shape[0]
    w = view.matrix()[0]
    scale = weight_scale(conv.weight, 4)  # a coarse grid makes the difference visible
    codes = gptq_round(w, h, scale, bits=4, symmetric=True)
    rtn = torch.clamp(torch.round(w / scale[:, None].double()), -7, 7)
    errs = [float(((cols @ (c.double() * scale[:, None].double() - w).T) ** 2).mean())
            for c in (codes, rtn)]
    assert errs[0] < 0.7 * errs[1]


def test_bad_settings_and_models_are_refused():
    with pytest.raises(RecipeError, match="pattern"):
        npr.SparseGPT(pattern="2-4")
    with pytest.raises(RecipeError, match="mode"):
        npr.Wanda(mode="fast")
    with pytest.raises(RecipeError, match="bits"):
        npr.GPTQ(bits=9)
    with pytest.raises(RecipeError, match="damp"):
        npr.GPTQ(damp=0)
    with pytest.raises(RecipeError, match="allocation"):
        npr.SparseGPT(allocation="best")
    data = [(torch.randn(4, 3), None)]
    with pytest.raises(ModelError, match="no Linear"):
        npr.compress(nn.Sequential(nn.ReLU()), npr.SparseGPT(), calibration=data,
                     measure=False)
    with pytest.raises(RecipeError, match="multiple of 4"):
        npr.compress(nn.Sequential(nn.Linear(3, 2)), npr.SparseGPT(pattern="2:4"), calibration=data,
                     measure=False)
    with pytest.raises(npr.DataError, match="calibration"):
        npr.compress(nn.Sequential(nn.Linear(3, 2)), npr.SparseGPT())


def test_recipe_round_trip_and_original_untouched():
    model = varied_teacher()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = npr.Recipe((npr.SparseGPT(sparsity=0.6, pattern="unstructured",
                                       mode="sequential-local", refit=True),
                         npr.GPTQ(bits=3, group_size=None, act_order=False)))
    assert npr.Recipe.from_yaml(recipe.to_yaml()) == recipe
    data = toy_batches(n=64, batch=32, model=model)
    res = npr.compress(model, recipe, calibration=data, measure=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    restored = io.BytesIO(dumps_artefact(res.model)).getvalue()
    assert load_artefact(restored).model is not None


@pytest.mark.parametrize("conv", [
    nn.Conv1d(4, 6, 3, padding=2, dilation=2, padding_mode="circular", groups=2),
    nn.Conv2d(4, 6, (3, 2), padding="same", padding_mode="reflect"),
    nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4, bias=False),
])
def test_group_quant_conv_computes_the_float_conv_of_its_weights(conv):
    model = nn.Sequential(conv).eval()
    res = npr.compress(model, npr.GPTQ(bits=4, group_size=8, rounding="nearest"),
                       measure=False)
    q = res.model[0]
    assert isinstance(q, GroupQuantConv)
    ref = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                     conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                     conv.padding_mode)
    with torch.no_grad():
        ref.weight.copy_(q.dequantized_weight().reshape(conv.weight.shape))
        if conv.bias is not None:
            ref.bias.copy_(conv.bias)
        x = torch.randn((2, 4, 9) if isinstance(conv, nn.Conv1d) else (2, 4, 7, 6))
        assert torch.allclose(q(x), ref(x), atol=1e-6)
        loaded = load_artefact(dumps_artefact(res.model)).model
        assert torch.equal(loaded(x), q(x))
