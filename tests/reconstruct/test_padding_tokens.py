"""Padding tokens stay out of the calibration statistics of SparseGPT / GPTQ / Wanda.

A text batch padded to a fixed length computes hidden states at the padding positions that
the model's outputs never read; with short sentences padded to 128 tokens they can be most
of a layer's input rows. The statistics (and so every fit) must be those of the real tokens
only: a padded batch gives the same Hessians, and the same compressed weights, as the same
sentences run unpadded one by one."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import netpress as npr
from netpress._inputs import real_tokens, token_mask
from netpress.reconstruct import GPTQ, SparseGPT, Wanda, engine
from netpress.reconstruct.engine import collect_statistics

LENGTHS = (5, 9, 14, 3)
SEQ = 16


def _bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval()


def _sentences() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 60, (n,), generator=g) for n in LENGTHS]


def _padded() -> list:
    ids = torch.zeros(len(LENGTHS), SEQ, dtype=torch.long)
    mask = torch.zeros(len(LENGTHS), SEQ, dtype=torch.long)
    for i, s in enumerate(_sentences()):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return [({"input_ids": ids, "attention_mask": mask}, None)]


def _one_by_one() -> list:
    return [({"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)},
             None) for s in _sentences()]


def test_token_mask_and_real_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    keep = token_mask({"input_ids": torch.zeros(2, 3), "attention_mask": mask})
    assert keep is not None and keep.dtype == torch.bool
    assert token_mask({"attention_mask": torch.ones(2, 3)}) is None  # nothing to drop
    assert token_mask(torch.zeros(2, 3)) is None and token_mask({"input_ids": mask}) is None
    x = torch.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    assert torch.equal(real_tokens(x, keep), torch.stack([x[0, 0], x[0, 1], x[1, 0]]))
    assert torch.equal(real_tokens(x.reshape(6, 4), keep), real_tokens(x, keep))
    other = torch.zeros(2, 4)  # a pooled (batch x d) input is not token-major
    assert real_tokens(other, keep) is other and real_tokens(x, None) is x


def test_padded_batches_give_the_real_tokens_statistics():
    model = _bert()
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.1.intermediate.dense",
             "encoder.layer.1.output.dense"]
    padded = collect_statistics(model, model, names, _padded())
    alone = collect_statistics(model, model, names, _one_by_one())
    for n in names:
        assert padded[n].samples == alone[n].samples == sum(LENGTHS)
        assert padded[n].hessian is not None and alone[n].hessian is not None
        scale = alone[n].hessian.abs().max()
        assert (padded[n].hessian - alone[n].hessian).abs().max() <= 1e-5 * scale, n


@pytest.mark.parametrize(("method", "limit"), [(SparseGPT(sparsity=0.5), 1e-5),
                                               (GPTQ(bits=4, group_size=16), 1e-3),
                                               (Wanda(sparsity=0.5), 1e-5),
                                               (SparseGPT(sparsity=0.5, refit_norms=True), 1e-5)],
                         ids=["sparsegpt", "gptq", "wanda", "sparsegpt-norms"])
def test_padding_does_not_change_the_compressed_weights(method, limit, monkeypatch):
    model = _bert()
    x = _one_by_one()[0][0]

    def run(data: list) -> nn.Module:
        return npr.compress(model, [method], calibration=data, example_inputs=x,
                            measure=False).model

    padded, alone = run(_padded()), run(_one_by_one())
    monkeypatch.setattr(engine, "token_mask", lambda inputs: None)
    kept = run(_padded())  # the padding rows kept in (the behaviour before)
    ids, mask = _padded()[0][0].values()
    with torch.no_grad():
        ref, new, one, old = (m(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
                              for m in (model, padded, alone, kept))
    same, err_new, err_old = (float((o - r).norm() / r.norm())
                              for o, r in ((new, one), (new, ref), (old, ref)))
    # padded or one by one: the same real tokens, the same fit (GPTQ: up to a rounding tie
    # falling the other way, about the size of its whole error on this tiny model, 3e-4)
    assert same <= limit
    assert err_new < err_old  # and a better fit of them than with the padding rows


def test_dynamic_quantize_outlier_ranges_skip_padding():
    from netpress.quant.dynamic import input_amax

    model = _bert()
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]
    padded = input_amax(model, names, [x for x, _ in _padded()])
    alone = input_amax(model, names, [x for x, _ in _one_by_one()])
    for n in names:
        assert torch.allclose(padded[n], alone[n], rtol=1e-5, atol=1e-6), n
