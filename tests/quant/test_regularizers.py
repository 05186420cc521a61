"""R² range regularizers: values, where their gradients go, and that they shrink ranges."""

import pytest
import torch

import netpress as npr
from netpress.errors import RecipeError
from netpress.quant.qat import QAT
from netpress.recover.regularizers import (
    linf,
    margin,
    range_penalty,
    soft_min_max,
    with_range_penalty,
)
from netpress.testing import TinyCNN, toy_batches


def test_linf_pushes_only_the_extreme_weight():
    w = torch.tensor([0.1, -3.0, 0.5, 2.9], requires_grad=True)
    linf(w).backward()
    assert float(linf(w.detach())) == 3.0 and w.grad.tolist() == [0.0, -1.0, 0.0, 0.0]


def test_margin_pushes_the_whole_top_band():
    w = torch.tensor([0.1, -3.0, 0.5, 2.9], requires_grad=True)
    value = margin(w, width=0.1)  # band: |w| > 2.7
    value.backward()
    assert w.grad[0] == 0 and w.grad[2] == 0
    assert float(w.grad[3]) > 0 and float(w.grad[1]) != 0  # both outliers pulled in
    with pytest.raises(ValueError):
        margin(w, width=0.0)


def test_soft_min_max_tends_to_the_range():
    w = torch.tensor([-1.0, 0.2, 0.3, 2.0])
    assert float(soft_min_max(w, temperature=0.01)) == pytest.approx(3.0, abs=1e-3)
    assert float(soft_min_max(w, temperature=10.0)) < 3.0
    w.requires_grad_(True)
    soft_min_max(w, 0.1).backward()
    assert float(w.grad[3]) > 0 and float(w.grad[0]) < 0  # gradient descent narrows it


@pytest.mark.parametrize("kind", ["linf", "margin", "soft_min_max"])
def test_descending_the_penalty_shrinks_every_layer_range(kind):
    torch.manual_seed(0)
    model = TinyCNN()
    before = {n: float(m.weight.detach().abs().max()) for n, m in model.named_children()
              if hasattr(m, "weight") and m.weight.dim() > 1}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        range_penalty(model, kind).backward()
        opt.step()
    after = {n: float(getattr(model, n).weight.detach().abs().max()) for n in before}
    assert all(after[n] < before[n] for n in before), (before, after)
    with pytest.raises(ValueError, match="unknown range regularizer"):
        range_penalty(model, "l2")


def test_with_range_penalty_adds_the_term():
    model = TinyCNN()

    def base(out, teacher, labels):
        return out.sum() * 0

    wrapped = with_range_penalty(base, model, "linf", 2.0)
    expected = 2.0 * float(range_penalty(model, "linf").detach())
    assert float(wrapped(torch.zeros(2, 4), None, None).detach()) == pytest.approx(expected)


def test_qat_with_range_regularization():
    model = TinyCNN().eval()
    data = toy_batches(32, 16, model=model)
    cfg = QAT(max_steps=3, lr=1e-3, range_reg="margin", range_reg_strength=1e-2)
    assert npr.Recipe.from_json(npr.Recipe((cfg,)).to_json()).steps[0] == cfg
    q = npr.compress(model, cfg, train=data, measure=False).model
    assert q.conv1.weight_q.dtype == torch.int8
    with pytest.raises(RecipeError, match="range_reg"):
        QAT(range_reg="l2")
