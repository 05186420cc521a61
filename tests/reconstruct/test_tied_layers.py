"""Pruning a layer whose weight another module shares (GPT-2's output layer tied to its input
embedding table) zeroes that module's weights too, fitted for the layer only: SparseGPT and
Wanda say so, naming both, and ``ignore=`` keeps the embeddings dense."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import netpress as npr
from netpress.reconstruct._common import tied_weights


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _data() -> list:
    g = torch.Generator().manual_seed(1)
    return [({"input_ids": torch.randint(0, 64, (4, 16), generator=g)}, None) for _ in range(3)]


def test_tied_weights_names_the_other_holder():
    model = _gpt2()
    assert tied_weights(model, ["lm_head", "transformer.h.0.mlp.c_fc"]) == {
        "lm_head": ["transformer.wte.weight"]}
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32))
    assert tied_weights(bert, [n for n, m in bert.named_modules()
                               if isinstance(m, torch.nn.Linear)]) == {}


@pytest.mark.parametrize("method", [npr.SparseGPT, npr.Wanda], ids=["sparsegpt", "wanda"])
def test_pruning_a_tied_output_layer_warns_and_ignore_keeps_the_embeddings(method):
    model, data = _gpt2(), _data()
    x = data[0][0]
    with pytest.warns(UserWarning, match=r"'lm_head' shares its weight with \['transformer\.wte"):
        res = npr.compress(model, [method(sparsity=0.5)], calibration=data, example_inputs=x,
                           measure=False)
    wte = res.model.transformer.wte.weight
    assert float((wte == 0).float().mean()) == pytest.approx(0.5, abs=0.01)  # what it warns of
    assert res.report["steps"][0]["tied"] == {"lm_head": ["transformer.wte.weight"]}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*shares its weight.*")
        kept = npr.compress(model, [method(sparsity=0.5, ignore=("lm_head",))],
                            calibration=data, example_inputs=x, measure=False).model
    assert not bool((kept.transformer.wte.weight == 0).any())
    assert torch.equal(kept.transformer.wte.weight, model.transformer.wte.weight)
    assert float((kept.transformer.h[0].mlp.c_fc.weight == 0).float().mean()) >= 0.45
