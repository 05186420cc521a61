"""Handed-over statistics (reconstruct.obs.Handover): consuming the Hessian and the cross term
in their last use gives bit-identical results and frees them before the factorizations."""

from __future__ import annotations

import weakref

import pytest
import torch
import transformers

import netpress as npr
from netpress.reconstruct import stats as stats_module
from netpress.reconstruct.engine import LayerStats
from netpress.reconstruct.gptq import gptq_quantize
from netpress.reconstruct.lstsq import refit_target
from netpress.reconstruct.obs import (
    Handover,
    damped,
    damped_lower_,
    hinv_cholesky,
    inverse_upper_,
    read,
)
from netpress.reconstruct.sparsegpt import sparsegpt
from netpress.testing import state_digest


def _spd(d: int, seed: int) -> torch.Tensor:
    x = torch.randn(3 * d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x.T @ x / (3 * d)


def test_handover_is_taken_once():
    t = torch.ones(2)
    box = Handover(t)
    assert read(box) is t and read(t) is t
    assert box.take() is t
    with pytest.raises(RuntimeError, match="already taken"):
        box.peek()


def _watch_cholesky(monkeypatch, gone: weakref.ref, seen: list[bool]) -> None:
    real = torch.linalg.cholesky

    def cholesky(a, *args, **kwargs):
        seen.append(gone() is None)
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky", cholesky)


def _copying_hinv(h: torch.Tensor, damp: float, perm: torch.Tensor | None) -> torch.Tensor:
    """The factor as computed before the in-place factorizations (three new matrices)."""
    a = h if perm is None else h[perm][:, perm]
    lower = torch.linalg.cholesky(damped(a, damp))
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


@pytest.mark.parametrize("permuted", [False, True])
def test_hinv_cholesky_of_a_handover_is_bit_identical_and_reuses_or_frees_the_hessian(
        permuted):
    d = 20
    h = _spd(d, 0)
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(1)) if permuted else None
    expected = _copying_hinv(h, 0.01, perm)
    assert torch.equal(hinv_cholesky(h, 0.01, perm=perm), expected)
    given = h.clone()
    ptr = given.data_ptr()
    ref = weakref.ref(given)
    box = Handover(given)
    del given
    got = hinv_cholesky(box, 0.01, perm=perm)
    assert torch.equal(got, expected)
    if permuted:  # freed once permuted
        assert ref() is None
    else:  # factored where it was: no second d x d matrix
        assert got.data_ptr() == ptr


def test_in_place_factors_match_the_copying_ones_also_for_an_asymmetric_rounding():
    """The factorizations read the lower triangle, as torch.linalg.cholesky does, even where
    float rounding left H's two triangles a hair apart."""
    d = 17
    h = _spd(d, 4)
    h += torch.triu(torch.full_like(h, 1e-12), 1)  # upper triangle off by rounding
    lower = torch.linalg.cholesky(damped(h, 0.01))
    got = damped_lower_(Handover(h.clone()), 0.01)
    assert torch.equal(got, lower) and got.mT.is_contiguous()
    assert torch.equal(inverse_upper_(got),
                       torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True))


def test_in_place_factorization_of_an_indefinite_matrix_raises():
    with pytest.raises(torch.linalg.LinAlgError, match="positive-definite"):
        damped_lower_(Handover(-torch.eye(4, dtype=torch.float64)), 0.01)


def test_refit_target_of_a_handed_over_cross_term_is_bit_identical_and_frees_it(monkeypatch):
    d, rows = 24, 7
    g = torch.Generator().manual_seed(2)
    h = _spd(d, 3)
    cross = h + 0.05 * torch.randn(d, d, dtype=torch.float64, generator=g)
    w = torch.randn(rows, d, dtype=torch.float64, generator=g)
    expected = refit_target(w, h, cross, 0.01)
    before = h.clone()
    given = cross.clone()
    ref = weakref.ref(given)
    box = Handover(given)
    del given
    seen: list[bool] = []
    _watch_cholesky(monkeypatch, ref, seen)
    got = refit_target(w, h, box, 0.01)
    assert torch.equal(got, expected) and torch.equal(h, before)
    assert seen == [True]  # the cross term was gone before the factorization


@pytest.mark.parametrize("act_order", [False, True])
def test_sweeps_of_a_handed_over_hessian_are_bit_identical(act_order):
    d, rows = 32, 6
    h = _spd(d, 4)
    w = torch.randn(rows, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a = gptq_quantize(w, h, 4, group_size=8, act_order=act_order, blocksize=8)
    b = gptq_quantize(w, Handover(h.clone()), 4, group_size=8, act_order=act_order,
                      blocksize=8)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight)
    pa, ka = sparsegpt(w, h, sparsity=0.5, blocksize=8)
    pb, kb = sparsegpt(w, Handover(h.clone()), sparsity=0.5, blocksize=8)
    assert torch.equal(pa, pb) and torch.equal(ka, kb)


class _NeverOwned(LayerStats):
    """LayerStats whose fits may never consume them (the behaviour before the handover)."""

    @property  # type: ignore[override]
    def owned(self) -> bool:
        return False

    @owned.setter
    def owned(self, value: bool) -> None:
        pass


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("recipe", [
    [npr.GPTQ(bits=4, group_size=16)],
    [npr.GPTQ(bits=4, group_size=16, act_order=False)],
    [npr.SparseGPT(sparsity=0.5)],
    [npr.SparseGPT(sparsity=0.5, refit=True)],
    [npr.SparseGPT(sparsity=0.5), npr.GPTQ(bits=4, group_size=16)],
], ids=lambda r: "+".join(type(s).__name__ for s in r))
def test_handing_over_in_the_pass_gives_bit_identical_models(recipe, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    data = [({"input_ids": torch.randint(0, 60, (4, 12), generator=gen),
              "attention_mask": torch.ones(4, 12, dtype=torch.long)}, None) for _ in range(2)]
    model = _bert()
    taken: list[int] = []
    real_take = Handover.take

    def take(self: Handover) -> torch.Tensor:
        taken.append(1)
        return real_take(self)

    monkeypatch.setattr(Handover, "take", take)
    handed = npr.compress(model, recipe, calibration=data, measure=False).model
    # the pass did hand statistics over (SparseGPT's refit keeps its Hessian to the end and
    # reads the residual statistic, which is never handed over)
    assert taken or any(getattr(s, "refit", False) for s in recipe)
    monkeypatch.setattr(stats_module, "LayerStats", _NeverOwned)
    taken.clear()
    kept = npr.compress(model, recipe, calibration=data, measure=False).model
    assert not taken
    assert state_digest(handed) == state_digest(kept)


@pytest.mark.parametrize("shape", [(0,), (5,), (3, 7), (2, 3, 8), (4, 0, 2), (16, 16)])
def test_packed_masks_round_trip_bit_for_bit(shape):
    from netpress.reconstruct.patterns import pack_mask, unpack_mask

    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) > 0.5
    packed = pack_mask(mask)
    n = mask.numel()
    assert packed.bits.dtype == torch.uint8 and packed.bits.numel() == -(-n // 8)
    flat = mask.reshape(-1).tolist()
    for i, byte in enumerate(packed.bits.tolist()):  # brute force: first entry, highest bit
        assert byte == sum(128 >> j for j in range(8) if 8 * i + j < n and flat[8 * i + j])
    back = unpack_mask(packed)
    assert back.dtype == torch.bool and back.shape == mask.shape and torch.equal(back, mask)
