"""Copy-on-write working copies (netpress._cow): the maths of sharing on tiny tensors, and
compress() proving that the caller's model is never written, that copy-on-write methods
really work on shared tensors and that the others get their own copy first."""

import dataclasses

import pytest
import torch
from torch import nn

import netpress as npr
from netpress import _cow, registry
from netpress.api import _shared_copy
from netpress.testing import state_digest, toy_batches, toy_models, toy_transformer


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_protection_is_counted_and_released():
    m = nn.Linear(3, 2)
    assert not _cow.is_protected(m.weight)
    with _cow.protected(m) as keys:
        assert _ptr(m.weight) in keys and _cow.is_protected(m.weight)
        with _cow.protected(m):  # nested (two compress calls on one model)
            assert _cow.is_protected(m.bias)
        assert _cow.is_protected(m.bias)  # still held by the outer block
    assert not _cow.is_protected(m.weight) and not _cow.is_protected(m.bias)
    with _cow.protected(None) as keys:
        assert keys == frozenset()


def test_own_copies_only_protected_tensors():
    user = nn.Linear(4, 3)
    work = _shared_copy(user)
    assert _ptr(work.weight) == _ptr(user.weight)
    before = user.weight.detach().clone()
    with _cow.protected(user):
        p = work.weight
        assert _cow.own_(p) is p and _ptr(p) != _ptr(user.weight)
        assert torch.equal(p, before)
        kept = _ptr(p)
        _cow.own_(p)  # already its own: no second copy
        assert _ptr(p) == kept
        p.data.mul_(0)
    assert torch.equal(user.weight, before)


def test_assign_never_writes_the_old_storage():
    user = nn.Linear(4, 3)
    work = _shared_copy(user)
    old = user.weight.detach().clone()
    value = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    with _cow.protected(user):
        p = work.weight
        assert _cow.assign_(p, value) is p and isinstance(p, nn.Parameter)
    assert p.dtype == torch.float32 and p.shape == (3, 4)
    assert torch.equal(p, value.float()) and torch.equal(user.weight, old)
    same = torch.ones(3, 4)  # same dtype: the new storage is still not ``value``'s own
    _cow.assign_(p, same)
    same.zero_()
    assert torch.equal(p, torch.ones(3, 4))
    flat = torch.zeros(12)  # reshaped to the tensor's shape
    _cow.assign_(p, flat)
    assert p.shape == (3, 4)


def test_materialize_copies_once_per_storage_and_keeps_ties():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight  # tied: one Parameter object
            self.register_buffer("whole", torch.arange(6.0))
            self.register_buffer("part", self.whole[2:5])  # a view of another buffer

    user = Tied()
    work = _shared_copy(user)
    with _cow.protected(user):
        assert _cow.shared_bytes(work) > 0
        copied = _cow.materialize(work)
        assert _cow.shared_bytes(work) == 0
    assert copied == 16 * 4 + 6 * 4  # the weight once, the buffer storage once
    assert work.a.weight is work.b.weight and _ptr(work.a.weight) != _ptr(user.a.weight)
    assert _ptr(work.part) == _ptr(work.whole) != _ptr(user.whole)
    work.whole.add_(1)
    assert torch.equal(work.part, torch.tensor([3.0, 4.0, 5.0]))
    assert torch.equal(user.whole, torch.arange(6.0))


def _probe(monkeypatch: pytest.MonkeyPatch, name: str, seen: list[int]) -> None:
    """Wrap method ``name`` so that it records the working copy's shared bytes at its start."""
    info = registry.get_method(name)

    def apply(model: nn.Module, cfg: object, ctx: object) -> nn.Module:
        seen.append(_cow.shared_bytes(model))
        return info.apply(model, cfg, ctx)

    monkeypatch.setitem(registry._METHODS, name, dataclasses.replace(info, apply=apply))


def test_copy_on_write_methods_share_and_the_others_copy_first(monkeypatch):
    model = toy_transformer()
    data = toy_batches(model=model)
    digest = state_digest(model)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    seen: dict[str, list[int]] = {"GPTQ": [], "FineTune": []}
    for name, found in seen.items():
        _probe(monkeypatch, name, found)
    recipe = [npr.GPTQ(bits=4, group_size=16), npr.FineTune(max_steps=2, lr=1e-3)]
    res = npr.compress(model, recipe, calibration=data, train=data, measure=False)
    assert seen["GPTQ"] == [size]  # GPTQ starts on a copy that shares every tensor
    assert seen["FineTune"] == [0]  # FineTune (in place) gets its own copy first
    assert state_digest(model) == digest
    mine = {_ptr(t) for t in model.state_dict().values()}
    assert not any(_ptr(t) in mine for t in res.model.state_dict().values())
    assert not _cow.is_protected(next(model.parameters()))  # released after compress()


@pytest.mark.parametrize("recipe", [
    [npr.SparseGPT(sparsity=0.5)],
    [npr.SparseGPT(sparsity=0.5, refit_bias=True, refit_norms=True)],
    [npr.Wanda(sparsity=0.5)],
    [npr.GPTQ(bits=4, group_size=16)],
    [npr.StructuredPrune(macs=0.6, round_to=1)],
    [npr.FisherPrune(macs=0.6, calibration_batches=2)],
    [npr.DepthPrune(blocks=0.34)],
    [npr.SparseGPT(sparsity=0.5), npr.GPTQ(bits=4, group_size=16)],
    [npr.StructuredPrune(macs=0.6, round_to=1, reconstruct=False)],
    [npr.SparseGPT(sparsity=0.5, mask_refine="admm")],
    [npr.DepthPrune(blocks=0.34), npr.GPTQ(bits=4, group_size=16)],
], ids=lambda r: "+".join(type(s).__name__ for s in r))
def test_copy_on_write_results_equal_full_copy_results(recipe, monkeypatch):
    """Copy-on-write changes memory only: the result is bit-identical to the one computed on
    a full working copy (every method forced to materialize first), and the input model is
    bit-identical afterwards."""
    model = toy_transformer()
    data = toy_batches(model=model)
    digest = state_digest(model)
    kwargs = dict(calibration=data, example_inputs=data[0][0][:1], measure=False)
    shared = npr.compress(model, recipe, **kwargs).model
    assert state_digest(model) == digest
    for step in recipe:
        info = registry.get_method(step)
        monkeypatch.setitem(registry._METHODS, info.name,
                            dataclasses.replace(info, copy_on_write=False))
    copied = npr.compress(model, recipe, **kwargs).model
    assert state_digest(shared) == state_digest(copied)


@pytest.mark.parametrize("reconstruct", [False, True])
@pytest.mark.parametrize("name", ["TinyCNN", "TinyResNet"])
def test_batchnorm_models_under_copy_on_write(name, reconstruct):
    """BatchNorm statistics recalibrated in place, or a refit's intercept folded into a
    running mean: on the working copy's own buffers, never the caller's."""
    model = toy_models()[name]
    data = toy_batches(model=model)
    digest = state_digest(model)
    res = npr.compress(model, npr.StructuredPrune(macs=0.5, round_to=1, recalibrate_bn=2,
                                                  reconstruct=reconstruct),
                       calibration=data, example_inputs=data[0][0][:1], measure=False)
    assert state_digest(model) == digest
    step = res.report["steps"][0]
    if reconstruct:
        assert step["reconstruct"]["refitted_layers"] > 0
    else:
        assert step["bn_recalibrated_batches"] == 2
