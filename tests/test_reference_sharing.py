"""compress() keeps one copy of the weights fewer: the reference shares the caller's tensors
(read only), the compressed model is a copy; with inplace=True nothing is shared."""

from __future__ import annotations

import copy

import torch

import netpress as npr
from netpress.testing import TinyCNN, state_equal, toy_batches


def test_the_reference_shares_the_callers_tensors_and_leaves_them_untouched() -> None:
    torch.manual_seed(0)
    model = TinyCNN().train()
    before = copy.deepcopy(model)
    data = toy_batches(model=model)
    result = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.6),
                                  npr.FineTune(max_steps=2, lr=1e-2)], train=data,
                          example_inputs=data[0][0][:1], measure=False)
    ref = result.reference
    assert ref.conv1.weight.data_ptr() == model.conv1.weight.data_ptr()  # no second copy
    assert result.model.conv1.weight.data_ptr() != model.conv1.weight.data_ptr()
    assert state_equal(model, before) and model.training  # the caller's model: as it was
    assert all(p.requires_grad for p in model.parameters())
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())


def test_inplace_compression_gets_a_real_reference_copy() -> None:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    original = copy.deepcopy(model)
    result = npr.compress(model, npr.GlobalMagnitudePrune(sparsity=0.6), inplace=True,
                          example_inputs=torch.randn(1, 1, 8, 8), measure=False)
    assert result.model is model
    assert result.reference.conv1.weight.data_ptr() != model.conv1.weight.data_ptr()
    assert state_equal(result.reference, original)
