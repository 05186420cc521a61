"""Post-training quantization: accuracy thresholds, coverage errors, bias correction, contract."""

import io
import warnings

import pytest
import torch
from torch import nn

import netpress as npr
from netpress.errors import ModelError, RecipeError
from netpress.export import dumps_artefact, load_artefact
from netpress.quant.modules import ActQuant, QuantConv2d, QuantLinear
from netpress.quant.primitives import sqnr
from netpress.quant.ptq import Quantize
from netpress.testing import TinyCNN, check_method_contract, toy_batches, toy_models


def _run(model, cfg, n=128):
    data = toy_batches(n, 32, model=model)
    result = npr.compress(model, cfg, calibration=data, measure=False)
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        return result.model, sqnr(model(x), result.model(x)), x


@pytest.mark.parametrize("name", list(toy_models()))
def test_int8_sqnr_on_toy_models(name):
    model = toy_models()[name]
    quantized, db, x = _run(model, Quantize())
    assert db > 35, f"W8A8 SQNR {db:.1f} dB"
    assert any(isinstance(m, ActQuant) for m in quantized.modules())
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in quantized.modules())
    _, db_w8, _ = _run(model, Quantize(activations=None))
    assert db_w8 > 42, f"W8 weight-only SQNR {db_w8:.1f} dB"
    with torch.no_grad():
        agree = (model(x).argmax(1) == quantized(x).argmax(1)).float().mean()
    assert agree >= 0.97


@pytest.mark.parametrize("observer", ["moving_average", "percentile", "mse", "entropy"])
def test_other_activation_observers(observer):
    _, db, _ = _run(toy_models()["TinyCNN"], Quantize(observer=observer))
    assert db > 25


def test_per_layer_bits_by_name_and_pattern():
    model = toy_models()["TinyCNN"]
    quantized, db, _ = _run(model, Quantize(weights=8, per_layer={"fc": 4, "re:conv2": 6},
                                            weight_observer="mse"))
    assert quantized.fc.bits == 4 and quantized.conv2.bits == 6 and quantized.conv1.bits == 8
    assert int(quantized.fc.weight_q.abs().max()) <= 7
    assert db > 15


def test_bias_correction_removes_the_mean_output_shift():
    torch.manual_seed(3)
    model = TinyCNN(width=16).eval()
    data = toy_batches(256, 64, model=model)
    x = torch.cat([b[0] for b in data])
    shifts = {}
    for correct in (False, True):
        cfg = Quantize(weights=3, activations=None, bias_correction=correct)
        q = npr.compress(model, cfg, calibration=data, measure=False).model
        with torch.no_grad():
            shifts[correct] = float((q(x) - model(x)).mean(0).abs().mean())
    assert shifts[True] < 0.5 * shifts[False]


class _WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.seq = nn.Conv1d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.norm(self.conv(x)).mean(-1)
        return self.fc(self.seq(y).mean(-1))


def test_unsupported_layers_stay_float_with_a_warning_or_fail_on_demand():
    model = _WithNorm().eval()
    data = [(torch.randn(8, 1, 6, 6), torch.zeros(8, dtype=torch.long))]
    with pytest.warns(UserWarning, match=r"stay in float: norm \(GroupNorm\), seq \(Conv1d\)"):
        q = npr.compress(model, Quantize(), calibration=data, measure=False).model
    assert isinstance(q.seq, nn.Conv1d) and isinstance(q.conv, QuantConv2d)
    assert isinstance(q.fc, QuantLinear)
    with pytest.raises(ModelError, match="require_full_coverage"):
        npr.compress(model, Quantize(require_full_coverage=True), calibration=data,
                     measure=False)
    with warnings.catch_warnings():  # ignoring them leaves nothing to warn about
        warnings.simplefilter("error")
        npr.compress(model, Quantize(ignore=("norm", "seq"), require_full_coverage=True),
                     calibration=data, measure=False)


def test_config_validation():
    with pytest.raises(RecipeError, match="weights"):
        Quantize(weights=9)
    with pytest.raises(RecipeError, match="activations"):
        Quantize(activations=1)
    with pytest.raises(RecipeError, match="observer"):
        Quantize(observer="median")
    with pytest.raises(RecipeError, match="per_layer"):
        Quantize(per_layer={"fc": 16})
    with pytest.raises(npr.SelectionError, match="matches no"):
        _run(toy_models()["TinyMLP"], Quantize(layers=("conv9",)))


def test_pruned_zeros_survive_quantization():
    model = toy_models()["TinyCNN"]
    data = toy_batches(64, 32, model=model)
    recipe = [npr.GlobalMagnitudePrune(sparsity=0.5, floor=0.1), Quantize()]
    q = npr.compress(model, recipe, calibration=data, measure=False).model
    codes = torch.cat([m.weight_q.reshape(-1) for m in q.modules()
                       if isinstance(m, (QuantConv2d, QuantLinear))])
    assert float((codes == 0).float().mean()) >= 0.5


def test_artefact_stores_int8_codes():
    torch.manual_seed(0)
    model = TinyCNN(width=32).eval()
    q, _, x = _run(model, Quantize())
    blob = dumps_artefact(q)
    assert len(blob) < 0.4 * len(dumps_artefact(model))
    loaded = load_artefact(io.BytesIO(blob).getvalue()).model
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


@pytest.mark.parametrize("name", list(toy_models()))
@pytest.mark.parametrize("cfg", [Quantize(), Quantize(weights=4, activations=None)],
                         ids=["w8a8", "w4"])
def test_contract(cfg, name):
    model = toy_models()[name]
    check_method_contract(cfg, model, toy_batches(model=model))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent branch: torch.fx cannot trace it
            x = x * 0
        return self.fc(torch.flatten(x, 1))


def test_untraceable_model_weight_only_works_activations_explain():
    model = _Untraceable().eval()
    data = toy_batches(32, 16)
    q = npr.compress(model, Quantize(activations=None), calibration=data, measure=False).model
    assert isinstance(q.fc, QuantLinear)
    with pytest.raises(ModelError, match="activations=None"):
        npr.compress(model, Quantize(), calibration=data, measure=False)


def test_an_untraceable_transformer_is_pointed_to_dynamic_quantize():
    """Equalization traces first: its failure gets the same advice as the quantizer's own."""
    import transformers

    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32)).eval()
    x = {"input_ids": torch.randint(0, 60, (2, 12)),
         "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    with pytest.raises(ModelError, match=r"cannot trace BertModel.*DynamicQuantize\(\)"):
        npr.compress(bert, Quantize(weights=8, activations=8), calibration=[(x, None)],
                     example_inputs=x, measure=False)


def test_weight_only_needs_no_calibration_data():
    from netpress.errors import DataError
    from netpress.registry import get_method

    info = get_method(Quantize)
    assert info.needs == ("calibration",)
    assert info.needs_of(Quantize(activations=None)) == ()
    torch.manual_seed(0)
    model = TinyCNN().eval()
    result = npr.compress(model, Quantize(activations=None), measure=False)
    x = torch.cat([b[0] for b in toy_batches(64, 32, model=model)])
    with torch.no_grad():
        db = sqnr(model(x), result.model(x))
    assert db > 40, f"W8 weight-only SQNR without calibration data {db:.1f} dB"
    with pytest.raises(DataError, match="calibration"):
        npr.compress(model, Quantize(), measure=False)
