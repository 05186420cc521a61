"""``count_macs`` of tiny ``transformers`` models: ``attn_implementation="sdpa"`` (the CPU
fused kernel) counts the same as ``"eager"`` (matmuls) and as the Linear layers plus the two
attention products counted by hand."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from netpress.measure.macs import count_macs, macs_breakdown

transformers = pytest.importorskip("transformers")

BATCH, SEQ = 2, 12


def _with_attention(model: Any, impl: str) -> Any:
    model.config._attn_implementation = impl
    return model


def _bert() -> tuple[Any, Any]:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    return cfg, transformers.BertModel(cfg).eval()


def _bert_macs(cfg: Any, batch: int, seq: int) -> int:
    """Per layer: q, k, v, out projections, FFN up/down, Q K^T and P V (all heads); the
    pooler's Linear on the first token."""
    h, inner = cfg.hidden_size, cfg.intermediate_size
    per_layer = seq * (4 * h * h + 2 * h * inner) + 2 * seq * seq * h
    return batch * (cfg.num_hidden_layers * per_layer + h * h)


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "padding"])
def test_bert_sdpa_and_eager_count_the_same(padded: bool) -> None:
    cfg, model = _bert()
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padded:  # an explicit attention mask reaches the SDPA kernel
        mask[1, 8:] = 0
    x = {"input_ids": torch.randint(0, 64, (BATCH, SEQ), generator=gen), "attention_mask": mask}
    eager = count_macs(_with_attention(model, "eager"), x)
    sdpa = count_macs(_with_attention(model, "sdpa"), x)
    assert abs(sdpa - eager) <= 1e-6 * eager
    assert eager == _bert_macs(cfg, BATCH, SEQ)
    attention = BATCH * cfg.num_hidden_layers * 2 * SEQ * SEQ * cfg.hidden_size
    assert attention / eager > 0.05  # a share the CPU count used to leave out
    assert macs_breakdown(model, x)["dense"] == sdpa


def _llama() -> tuple[Any, Any]:
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=32)
    torch.manual_seed(0)
    return cfg, transformers.LlamaForCausalLM(cfg).eval()


def _llama_macs(cfg: Any, batch: int, seq: int) -> int:
    """Per layer: q (all heads), k and v (key/value heads), o, gate/up/down, and the causal
    Q K^T and P V counted in full for every query head (as torch's CUDA formula does);
    the LM head. (The rotary embedding's ``inv_freq @ positions`` has an inner size of 1:
    PyTorch runs it as an elementwise product, no MACs.)"""
    h, inner, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    projections = h * nq * d * 2 + h * nkv * d * 2 + 3 * h * inner
    per_layer = seq * projections + 2 * nq * seq * seq * d
    return batch * (cfg.num_hidden_layers * per_layer + seq * h * cfg.vocab_size)


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padding"])
def test_llama_grouped_query_sdpa_and_eager_count_the_same(padded: bool) -> None:
    cfg, model = _llama()
    gen = torch.Generator().manual_seed(0)
    x: dict[str, torch.Tensor] = {
        "input_ids": torch.randint(0, 96, (BATCH, SEQ), generator=gen)}
    if padded:
        x["attention_mask"] = torch.ones(BATCH, SEQ, dtype=torch.long)
        x["attention_mask"][0, :3] = 0
    eager = count_macs(_with_attention(model, "eager"), x)
    sdpa = count_macs(_with_attention(model, "sdpa"), x)
    assert abs(sdpa - eager) <= 1e-6 * eager
    assert eager == _llama_macs(cfg, BATCH, SEQ)
