"""Recovery's ``bn`` option: frozen BatchNorm keeps its running statistics, train re-estimates."""

import pytest
import torch

import netpress as npr
from netpress.errors import RecipeError
from netpress.recover.loop import train_mode
from netpress.testing import TinyCNN, toy_batches


def _bn_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("bn1.")}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.mark.parametrize("method", [npr.Distill, npr.FineTune])
def test_frozen_bn_keeps_running_stats_and_trains_affine(model, method):
    data = toy_batches(n=64, batch=16, seed=3)
    before = _bn_state(model)
    out = npr.compress(model, [method(max_steps=2, lr=1e-2, bn="frozen")], train=data,
                       measure=False).model
    after = _bn_state(out)
    for key in ("bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"):
        assert torch.equal(after[key], before[key]), key  # bit-identical
    assert not torch.equal(after["bn1.weight"], before["bn1.weight"])  # affine still trained
    assert not out.training


def test_train_bn_re_estimates_running_stats(model):
    data = toy_batches(n=64, batch=16, seed=3)
    before = _bn_state(model)
    out = npr.compress(model, [npr.Distill(max_steps=2, lr=1e-2)], train=data,
                       measure=False).model
    after = _bn_state(out)
    assert (after["bn1.running_mean"] - before["bn1.running_mean"]).abs().max() > 1e-4
    assert int(after["bn1.num_batches_tracked"]) == int(before["bn1.num_batches_tracked"]) + 2


def test_train_mode_only_bn_stays_in_eval(model):
    m = TinyCNN()
    train_mode(m, "frozen")
    assert m.training and m.conv1.training and not m.bn1.training
    train_mode(m, "train")
    assert m.bn1.training


@pytest.mark.parametrize("method", [npr.Distill, npr.FineTune, npr.LabelPreserve])
def test_bad_bn_value_is_refused_by_name(method):
    with pytest.raises(RecipeError, match=r"bn='eval'.*'train', 'frozen'"):
        method(bn="eval")
