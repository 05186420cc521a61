"""Distill's per-layer feature term: the loss maths on tiny tensors, the hooks, errors."""

import copy

import pytest
import torch

import netpress as npr
from netpress.errors import ModelError, RecipeError, SelectionError
from netpress.recover.losses import feature_loss
from netpress.testing import TinyCNN, toy_batches


def test_feature_loss_is_the_mean_relative_squared_error():
    s1, t1 = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])    # 4 / 17
    s2, t2 = torch.tensor([[0.0, 3.0]]), torch.tensor([[1.0, 1.0]])  # (1 + 4) / 2
    assert float(feature_loss([(s1, t1), (s2, t2)])) == pytest.approx((4 / 17 + 5 / 2) / 2)
    assert float(feature_loss([])) == 0.0


def _perturbed(seed=0):
    torch.manual_seed(seed)
    ref = TinyCNN().eval()
    model = copy.deepcopy(ref)
    with torch.no_grad():
        model.conv1.weight.mul_(torch.rand_like(model.conv1.weight) > 0.5)
    return ref, model


def _feature_error(model, ref, x):
    outs = {}
    hooks = [m.conv2.register_forward_hook(lambda _m, _a, o, k=k: outs.__setitem__(k, o))
             for k, m in (("s", model), ("t", ref))]
    with torch.no_grad():
        model.eval()(x), ref.eval()(x)
    for h in hooks:
        h.remove()
    return float(((outs["s"] - outs["t"]) ** 2).sum() / (outs["t"] ** 2).sum())


def test_feature_term_pulls_the_named_module_towards_the_reference():
    ref, model = _perturbed()
    data = toy_batches(n=128, batch=32, seed=1)
    x = torch.cat([b[0] for b in data])
    before = _feature_error(model, ref, x)
    common = {"max_steps": 20, "lr": 5e-3, "bn": "frozen", "alpha": 1.0}
    plain = npr.compress(model, npr.Distill(**common), train=data, reference=ref,
                         measure=False)
    feats = npr.compress(model, npr.Distill(features=("conv2",), feature_weight=10.0,
                                            **common), train=data, reference=ref,
                         measure=False)
    after_plain = _feature_error(plain.model, ref, x)
    after_feats = _feature_error(feats.model, ref, x)
    assert after_feats < 0.5 * before
    assert after_feats < after_plain
    assert feats.report["steps"][-1]["features"] == 1


def test_feature_errors_are_clear():
    ref, model = _perturbed()
    data = toy_batches(n=32, batch=16)
    with pytest.raises(SelectionError, match="feature module"):
        npr.compress(model, npr.Distill(max_steps=1, features=("nope",)), train=data,
                     reference=ref, measure=False)
    small = copy.deepcopy(model)
    small.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1, stride=2)  # another output shape
    with pytest.raises(ModelError, match="conv2"):
        npr.compress(small, npr.Distill(max_steps=1, features=("conv2",)), train=data,
                     reference=ref, measure=False)
    with pytest.raises(RecipeError, match="feature_weight"):
        npr.Distill(features=("conv2",), feature_weight=-1.0)
    cfg = npr.Distill(features=("re:conv\\d",), feature_weight=0.5)
    assert npr.Distill.from_dict(cfg.to_dict()) == cfg
