"""Importance criteria: pure functions on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from netpress.prune.importance import (
    aggregate,
    hessian_saliency,
    hutchinson_diagonal,
    magnitude,
    normalize,
    taylor,
    unit_scores,
)


def test_magnitude_l1_l2():
    rows = torch.tensor([[3.0, -4.0], [0.0, 1.0]])
    assert magnitude(rows, 1).tolist() == [7.0, 1.0]
    assert magnitude(rows, 2).tolist() == [25.0, 1.0]


def test_taylor_is_abs_of_summed_product():
    w = torch.tensor([[1.0, 2.0], [1.0, -1.0]])
    g = torch.tensor([[0.5, -1.0], [2.0, 2.0]])
    assert taylor(w, g).tolist() == [1.5, 0.0]


def test_hessian_saliency_trace_times_norm():
    w = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    d = torch.tensor([[2.0, 4.0], [-1.0, -1.0]])
    assert hessian_saliency(w, d).tolist() == [6.0, 4.0]


def test_aggregate_averages_then_normalises_by_the_mean():
    big = torch.tensor([100.0, 300.0])
    small = torch.tensor([3.0, 1.0])
    assert normalize(big).tolist() == [0.5, 1.5]
    assert aggregate([big, small]).tolist() == pytest.approx([103 / 202, 301 / 202])
    assert normalize(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]


def test_unit_scores_bn_scale_uses_only_bn_and_falls_back_to_l2():
    conv = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    gamma = torch.tensor([[0.1], [0.9]])
    s = unit_scores("bn_scale", [conv, gamma], is_bn=[False, True])
    assert s.argmax().item() == 1
    s2 = unit_scores("bn_scale", [conv], is_bn=[False])
    assert s2.argmax().item() == 0
    with pytest.raises(ValueError, match="unknown importance"):
        unit_scores("nope", [conv])
    with pytest.raises(ValueError, match="needs gradients"):
        unit_scores("taylor", [conv], [None])


def test_hutchinson_is_exact_for_a_diagonal_quadratic():
    w = torch.randn(5, requires_grad=True)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    loss = 0.5 * (a * w * w).sum()
    (diag,) = hutchinson_diagonal(loss, [w], samples=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(diag, a)
