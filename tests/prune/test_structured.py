"""StructuredPrune as a method: config, targets, rounding, protection, errors, artefacts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netpress as npr
from netpress.errors import DataError, ModelError, RecipeError, SelectionError
from netpress.export import load_artefact
from netpress.measure.macs import count_macs
from netpress.models import build_model
from netpress.prune.structured import StructuredPrune, prune_structured
from netpress.testing import check_method_contract, state_equal, toy_batches, toy_models

pytestmark = pytest.mark.usefixtures("one_thread")


X32 = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kwargs, field", [
    ({}, "macs="), ({"macs": 0.5, "params": 0.5}, "macs="), ({"macs": 1.5}, "macs=1.5"),
    ({"macs": 0.5, "importance": "l3"}, "importance"),
    ({"macs": 0.5, "allocation": "greedy"}, "allocation"),
    ({"macs": 0.5, "round_to": 0}, "round_to"), ({"macs": 0.5, "floor": 2.0}, "floor"),
    ({"macs": 0.5, "on_unsupported": "skip"}, "on_unsupported"),
    ({"macs": 0.5, "protect": "fc"}, "protect"),
])
def test_config_is_validated(kwargs, field):
    with pytest.raises(RecipeError, match=field):
        StructuredPrune(**kwargs)


@pytest.mark.parametrize("model_name", list(toy_models()))
def test_method_contract(model_name):
    model = toy_models()[model_name]
    check_method_contract(StructuredPrune(macs=0.5, round_to=1), model, toy_batches(model=model))


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_macs_target_met_and_close(allocation):
    model = build_model("cifar_resnet20").eval()
    ref = count_macs(model, X32)
    pruned, info = prune_structured(model, StructuredPrune(macs=0.5, round_to=1,
                                                           allocation=allocation), X32)
    macs = count_macs(pruned, X32)
    assert 0.45 * ref <= macs <= 0.5 * ref
    assert info["macs_after"] == macs
    assert pruned(X32).shape == (1, 10)


def test_params_target_and_round_to():
    model = build_model("vgg11_cifar").eval()
    ref = sum(p.numel() for p in model.parameters())
    pruned, _ = prune_structured(model, StructuredPrune(params=0.4), X32)
    assert sum(p.numel() for p in pruned.parameters()) <= 0.4 * ref
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels % 8 == 0
            assert m.weight.shape[0] == m.out_channels and m.weight.shape[1] == m.in_channels


def test_protected_layers_and_classifier_keep_their_shape():
    model = build_model("cifar_resnet20").eval()
    pruned, _ = prune_structured(model, StructuredPrune(macs=0.6, protect=("re:layer1\\..*",)),
                                 X32)
    for name, p in model.named_parameters():
        if name.startswith("layer1.") and "conv1" in name:
            assert pruned.get_parameter(name).shape == p.shape
    assert pruned.linear.weight.shape[0] == 10
    with pytest.raises(SelectionError, match="nothing_here"):
        npr.compress(model, StructuredPrune(macs=0.5, protect=("nothing_here",)),
                     example_inputs=X32, measure=False)


class _Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.block = nn.Sequential(nn.Linear(32, 32), nn.Sigmoid())
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(torch.logit(self.block(h), eps=1e-6))


def test_unsupported_op_is_an_error_naming_op_and_module_and_model_untouched():
    model = _Unknown().eval()
    before = copy.deepcopy(model)
    x = torch.randn(2, 8)
    with pytest.raises(ModelError, match="'logit' in module '<root>'"):
        npr.compress(model, StructuredPrune(macs=0.6, round_to=1), example_inputs=x,
                     measure=False)
    assert state_equal(model, before)
    with pytest.warns(UserWarning, match="logit"):
        out = npr.compress(model, StructuredPrune(macs=0.7, round_to=1,
                                                  on_unsupported="exclude"),
                           example_inputs=x, measure=False).model
    assert out.fc1.out_features < 32 and out.block[0].out_features == 32
    assert state_equal(model, before)


def test_unreachable_target_is_a_recipe_error():
    model = toy_models()["TinyMLP"]
    with pytest.raises(RecipeError, match="cannot be reached"):
        prune_structured(model, StructuredPrune(macs=0.01, floor=0.5), torch.randn(1, 1, 8, 8))


@pytest.mark.parametrize("importance", ["l1", "bn_scale", "taylor", "hessian"])
def test_importances_run(importance):
    model = toy_models()["TinyCNN"]
    data = toy_batches(model=model)
    res = npr.compress(model, StructuredPrune(macs=0.5, round_to=1, importance=importance),
                       calibration=data, example_inputs=data[0][0][:1], measure=False)
    assert count_macs(res.model, data[0][0][:1]) <= 0.5 * count_macs(model, data[0][0][:1])


def test_fp16_hessian_on_cpu_warns_and_ranks_like_fp32():
    from netpress.context import Context
    from netpress.prune._saliency import _derivatives

    model = toy_models()["TinyCNN"]
    data = toy_batches(model=model)
    params = [model.conv1.weight, model.conv2.weight]
    diag = {}
    for fp16 in (False, True):
        cfg = StructuredPrune(macs=0.5, importance="hessian", fp16=fp16, hessian_samples=8)
        ctx = Context(reference=model, device=torch.device("cpu"), calibration=data)
        if fp16:
            with pytest.warns(UserWarning, match="no fast FP16"):
                diag[fp16] = _derivatives(model, params, cfg, ctx)
        else:
            diag[fp16] = _derivatives(model, params, cfg, ctx)
    for full, half in zip(diag[False], diag[True]):
        # the same Rademacher probes: FP16 moves the estimate by rounding only
        a, b = full.flatten(), half.flatten()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.95
    with pytest.warns(UserWarning, match="no fast FP16"):
        res = npr.compress(model, StructuredPrune(macs=0.5, round_to=1, importance="hessian",
                                                  fp16=True),
                           calibration=data, example_inputs=data[0][0][:1], measure=False)
    assert count_macs(res.model, data[0][0][:1]) <= 0.5 * count_macs(model, data[0][0][:1])


def test_data_importance_needs_data():
    model = toy_models()["TinyCNN"]
    with pytest.raises(DataError, match="calibration"):
        npr.compress(model, StructuredPrune(macs=0.5, importance="taylor"),
                     example_inputs=torch.randn(1, 1, 8, 8), measure=False)


def test_iterative_steps_and_unstructured_masks_follow():
    model = toy_models()["TinyCNN"]
    x = torch.randn(1, 1, 8, 8)
    res = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.5),
                               StructuredPrune(macs=0.5, round_to=1, iterative_steps=2)],
                       example_inputs=x, measure=False)
    step = res.report["steps"][-1] if isinstance(res.report["steps"], list) else None
    assert step is not None and step["macs_after"] <= step["macs_target"]
    w = res.model.conv2.weight
    assert w.shape[0] < 16 and math.isclose(float((w == 0).float().mean()), 0.5, abs_tol=0.2)


def test_pruning_interleaved_with_recovery_targets_the_original():
    model = toy_models()["TinyCNN"]
    data = toy_batches(model=model)
    x = data[0][0][:1]
    res = npr.compress(model, [StructuredPrune(macs=0.7, round_to=1), npr.Distill(max_steps=2),
                               StructuredPrune(macs=0.4, round_to=1), npr.Distill(max_steps=2)],
                       train=data, example_inputs=x, measure=False)
    steps = [s for s in res.report.to_dict()["steps"] if s["step"] == "StructuredPrune"]
    base = count_macs(model, x)
    assert steps[0]["macs_after"] <= 0.7 * base < steps[0]["macs_before"]
    assert steps[1]["macs_before"] == steps[0]["macs_after"]  # the second step goes further
    assert count_macs(res.model, x) <= 0.4 * base


def test_pruned_cifar_resnet_saves_and_loads_without_its_class(tmp_path):
    model = build_model("cifar_resnet20").eval()
    res = npr.compress(model, StructuredPrune(macs=0.5), example_inputs=X32, measure=False)
    path = tmp_path / "r20.npress"
    res.save(path)
    with torch.no_grad():
        want = res.model(X32)
        assert torch.equal(npr.load(path)(X32), want)
        assert torch.equal(load_artefact(path, model=build_model("cifar_resnet20")).model(X32),
                           want)


def test_compress_transformers_with_dict_inputs_and_template_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    template = copy.deepcopy(model)
    x = {"input_ids": torch.randint(0, 100, (1, 6)), "attention_mask": torch.ones(1, 6).long()}
    res = npr.compress(model, [StructuredPrune(macs=0.5)], example_inputs=x, measure=False)
    assert count_macs(res.model, x) <= 0.5 * count_macs(model, x)
    assert res.model(**x).last_hidden_state.shape == model(**x).last_hidden_state.shape
    res.save(tmp_path / "bert.npress")
    loaded = load_artefact(tmp_path / "bert.npress", model=template).model
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).last_hidden_state,
                                   res.model(**x).last_hidden_state)


class _MHA(nn.Module):
    def __init__(self, need_weights: bool, bias_kv: bool = False) -> None:
        super().__init__()
        self.need_weights = need_weights
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True, add_bias_kv=bias_kv)
        self.fc = nn.Linear(32, 64)
        self.out = nn.Linear(64, 3)

    def forward(self, x):
        y, _ = self.mha(x, x, x, need_weights=self.need_weights)
        return self.out(F.relu(self.fc(y))).mean(1)


def test_multihead_attention_heads_are_pruned_when_weights_are_not_needed():
    x = torch.randn(2, 6, 32)
    pruned, info = prune_structured(_MHA(False).eval(), StructuredPrune(macs=0.5), x)
    assert info["split_attention"] == ["mha"] and pruned.mha.num_heads < 4
    assert pruned.mha.q_proj.out_features == 8 * pruned.mha.num_heads
    kept, _ = prune_structured(_MHA(True).eval(), StructuredPrune(macs=0.8), x)
    assert kept.mha.num_heads == 4  # averaged attention weights are an output: heads stay
    whole, info = prune_structured(_MHA(False, bias_kv=True).eval(),
                                   StructuredPrune(macs=0.8), x)
    assert isinstance(whole.mha, nn.MultiheadAttention) and info["split_attention"] == []


def test_pruned_attention_heads_save_and_load(tmp_path):
    x = torch.randn(2, 6, 32)
    res = npr.compress(_MHA(False).eval(), StructuredPrune(macs=0.5), example_inputs=x,
                       measure=False)
    res.save(tmp_path / "mha.npress")
    with torch.no_grad():
        want = res.model(x)
        assert torch.equal(npr.load(tmp_path / "mha.npress")(x), want)
        loaded = load_artefact(tmp_path / "mha.npress", model=_MHA(False)).model
        assert torch.equal(loaded(x), want)


def test_batchnorm_statistics_are_recalibrated_after_pruning():
    from netpress.prune.bn_recalibrate import recalibrate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Dropout(0.5), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    model.eval()
    data = [(torch.randn(32, 3, 8, 8) * 3 + 1, torch.randint(0, 4, (32,))) for _ in range(4)]
    # the statistics of the pruned model's data, as recalibration should find them
    res = npr.compress(model, StructuredPrune(macs=0.5, round_to=1, reconstruct=False),
                       calibration=data, example_inputs=data[0][0][:1], measure=False)
    step = res.report.to_dict()["steps"][0]
    assert step["bn_recalibrated_batches"] == 4
    bn = res.model[1]
    feats = torch.cat([res.model[0](x) for x, _ in data]).detach()
    mean = feats.mean(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean, mean, atol=1e-4)
    assert bn.momentum == 0.1 and not bn.training and not res.model[3].training
    off = npr.compress(model, StructuredPrune(macs=0.5, round_to=1, recalibrate_bn=0,
                                              reconstruct=False),
                       calibration=data, example_inputs=data[0][0][:1], measure=False)
    assert "bn_recalibrated_batches" not in off.report.to_dict()["steps"][0]
    assert torch.all(off.model[1].running_mean == 0)  # untouched: the fresh BN's zeros
    # no batches: statistics are left as they were
    before = res.model[1].running_mean.clone()
    assert recalibrate_batchnorm(res.model, [], limit=4) == 0
    assert torch.equal(res.model[1].running_mean, before)
    with pytest.raises(RecipeError, match="recalibrate_bn"):
        StructuredPrune(macs=0.5, recalibrate_bn=-1)
