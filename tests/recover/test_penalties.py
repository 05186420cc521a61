"""The activation-sparsity and condition-number recovery terms (issue 15)."""

from __future__ import annotations

import math

import pytest
import torch

import netpress as npr
from netpress.errors import RecipeError, SelectionError
from netpress.recover.regularizers import (
    activation_l1,
    condition_number,
    condition_surrogate,
)
from netpress.testing import TinyMLP, toy_batches, varied_teacher


def test_activation_l1_is_the_sum_of_mean_magnitudes():
    a, b = torch.tensor([[1.0, -3.0]]), torch.zeros(2, 2)
    assert float(activation_l1([a, b])) == pytest.approx(2.0)
    assert float(activation_l1([])) == 0.0


def test_condition_surrogate_brackets_the_condition_number():
    g = torch.Generator().manual_seed(0)
    for shape in ((4, 4), (3, 7), (8, 2, 3, 3)):
        w = torch.randn(*shape, generator=g)
        kappa = condition_number(w)
        m = w.reshape(w.shape[0], -1)
        s = torch.linalg.svdvals(m)
        assert kappa == pytest.approx(float(s.max() / s.min()), rel=1e-5)
        r = min(m.shape)
        value = float(condition_surrogate(w, eps=1e-9))
        assert 2 * math.log(kappa) - 2 * math.log(r) - 1e-4 <= value <= 2 * math.log(kappa) + 1e-4
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    assert float(condition_surrogate(3.0 * q, eps=1e-9)) == pytest.approx(0.0, abs=1e-5)


def test_condition_surrogate_ignores_pruned_rows_and_columns():
    w = torch.diag(torch.tensor([2.0, 1.0, 0.0]))
    assert condition_number(w) == pytest.approx(2.0)
    assert math.isfinite(float(condition_surrogate(w)))


def test_descending_the_surrogate_lowers_the_condition_number():
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(6, 6, generator=g) @ torch.diag(torch.logspace(0, -2, 6))).requires_grad_()
    before = condition_number(w)
    opt = torch.optim.SGD([w], lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        condition_surrogate(w).backward()
        opt.step()
    assert condition_number(w) < 0.5 * before


def _mean_hidden(model: torch.nn.Module, data: list) -> float:
    with torch.no_grad():
        return float(torch.cat([torch.relu(model.fc1(x.flatten(1))) for x, _ in data]).mean())


def test_act_sparsity_shrinks_the_chosen_activations():
    teacher = varied_teacher()
    data = toy_batches(model=teacher)
    base = npr.Distill(max_steps=30, lr=1e-2)
    plain = npr.compress(teacher, base, train=data, measure=False).model
    sparse = npr.compress(teacher, npr.Distill(max_steps=30, lr=1e-2, act_sparsity=1.0,
                                               act_layers=("fc1",)),
                          train=data, measure=False).model
    assert _mean_hidden(sparse, data) < 0.7 * _mean_hidden(plain, data)


def test_cond_reg_lowers_the_condition_number_of_pruned_layers():
    teacher = varied_teacher()
    data = toy_batches(model=teacher)
    prune = npr.GlobalMagnitudePrune(sparsity=0.8)
    plain = npr.compress(teacher, [prune, npr.Distill(max_steps=40, lr=1e-2)], train=data,
                         measure=False).model
    reg = npr.compress(teacher, [prune, npr.Distill(max_steps=40, lr=1e-2, cond_reg=1.0)],
                       train=data, measure=False).model
    assert condition_number(reg.fc1.weight) < condition_number(plain.fc1.weight)
    assert float((reg.fc1.weight == 0).float().mean()) >= 0.5  # masks still applied


def test_penalty_settings_are_checked():
    with pytest.raises(RecipeError, match="act_sparsity"):
        npr.FineTune(act_sparsity=-1.0)
    with pytest.raises(RecipeError, match="cond_layers"):
        npr.Distill(cond_reg=1.0, cond_layers="fc1")  # type: ignore[arg-type]
    model = TinyMLP()
    with pytest.raises(SelectionError, match="act_layers"):
        npr.compress(model, npr.Distill(max_steps=1, act_sparsity=1.0),
                     train=toy_batches(model=model), measure=False)
