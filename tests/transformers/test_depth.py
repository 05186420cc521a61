"""Depth pruning: the block that changes the output least goes, and the model stays whole."""

from __future__ import annotations

import pytest
import torch

import netpress as npr
from netpress.errors import ModelError, RecipeError
from netpress.prune.depth import DepthPrune, block_scores, find_block_stack, output_change
from netpress.testing import toy_batches, toy_transformer


def _silenced(model, index):
    block = model.blocks[index]
    with torch.no_grad():
        for layer in (block.o, block.down):
            layer.weight.mul_(1e-3)
            layer.bias.zero_()
    return model


def test_output_change_is_a_relative_squared_error_over_real_positions():
    ref = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])
    out = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert output_change(ref, out) == (26.0, 26.0)
    assert output_change(ref, out, torch.tensor([[True, False]])) == (1.0, 1.0)


def test_the_near_identity_block_scores_lowest_and_is_dropped():
    model = _silenced(toy_transformer(), 1)
    data = toy_batches(n=32, batch=16)
    xs = [x for x, _ in data]
    for criterion in ("output", "cosine"):
        scores = block_scores(model, model.blocks, xs, criterion)
        assert min(range(3), key=scores.__getitem__) == 1, (criterion, scores)
    res = npr.compress(model, [DepthPrune(blocks=0.34)], calibration=data, evaluate=data)
    assert len(res.model.blocks) == 2
    assert res.report["agreement"] >= 0.95
    kept = [model.blocks[0], model.blocks[2]]
    with torch.no_grad():
        h = model.embed(xs[0].flatten(1, 2))
        for b in kept:
            h = b(h)
        torch.testing.assert_close(res.model(xs[0]), model.head(h.mean(1)))


def test_keep_first_and_refusals():
    model = toy_transformer()
    data = toy_batches(n=16, batch=16)
    with pytest.raises(RecipeError, match="between 1 and"):
        npr.compress(model, [DepthPrune(blocks=0.9, keep_first=2)], calibration=data,
                     measure=False)
    with pytest.raises(ModelError, match="no stack"):
        npr.compress(torch.nn.Linear(64, 4), [DepthPrune()], calibration=[
            (torch.randn(2, 64), None)], measure=False)
    with pytest.raises(RecipeError):
        DepthPrune(blocks=1.5)
    assert find_block_stack(model)[0] == "blocks"


def test_llama_blocks_drop_and_write_back_as_a_transformers_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    from netpress.models.hf import save_pretrained

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    data = [({"input_ids": torch.randint(0, 64, (2, 9), generator=gen),
              "attention_mask": torch.ones(2, 9, dtype=torch.long)}, None) for _ in range(2)]
    res = npr.compress(model, [DepthPrune(blocks=0.25)], calibration=data, measure=False)
    pruned = res.model
    assert len(pruned.model.layers) == 3 and pruned.config.num_hidden_layers == 3
    assert [b.self_attn.layer_idx for b in pruned.model.layers] == [0, 1, 2]
    assert model.config.num_hidden_layers == 4  # the input model is untouched
    assert save_pretrained(pruned, tmp_path / "hf", example_inputs=data[0][0]) == "dense"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                              local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**data[0][0]).logits, pruned(**data[0][0]).logits)
