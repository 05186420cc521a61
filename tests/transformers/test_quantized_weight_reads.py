"""Quantized layers keep a readable ``weight`` (transformers code reads ``layer.weight.dtype``:
ViT's patch embedding, AXK2's indexer), and a Hessian that cannot be factored is refused
naming its layer (issue 13's one-shot sweep, benchmarks/oneshot_coverage.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netpress as npr
from netpress.errors import ModelError
from netpress.measure.macs import macs_breakdown
from netpress.quant.dynamic import DynamicQuantLinear
from netpress.reconstruct import GPTQ, SparseGPT
from netpress.reconstruct.modules import GroupQuantConv

transformers = pytest.importorskip("transformers")


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))


def test_gptq_vit_runs_and_its_patch_conv_shows_its_weight():
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, image_size=32, patch_size=8,
                                 num_labels=10)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 32, 32, generator=gen), None) for _ in range(4)]
    x = data[0][0][:1]
    q = npr.compress(model, [GPTQ(bits=8, group_size=64)], calibration=data, example_inputs=x,
                     measure=False).model  # before: AttributeError in ViT's forward
    patch = q.vit.embeddings.patch_embeddings.projection
    assert isinstance(patch, GroupQuantConv)
    assert patch.weight.shape == (64, 3, 8, 8) and patch.weight.dtype == torch.float32
    torch.testing.assert_close(patch.weight.flatten(1), patch.dequantized_weight())
    held = torch.randn(8, 3, 32, 32, generator=gen)
    with torch.no_grad():
        assert _sqnr(model(held).logits, q(held).logits) > 30
    split = macs_breakdown(q, x)  # the coded layers still count as coded
    assert split["coded"] > 0.5 * split["dense"]


def test_dynamic_linear_weight_is_the_float_weight_it_stands_for():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    in_scale = torch.ones(32)
    in_scale[[3, 7]] = 4.0  # outlier channels scaled
    q = DynamicQuantLinear.from_float(linear, "generic", in_scale)
    x = torch.randn(64, 32)
    assert _sqnr(linear.weight, q.weight) > 35
    assert _sqnr(q(x), F.linear(x, q.weight, q.bias)) > 30


def test_dynamic_quantize_axk2_whose_indexer_reads_its_weight_dtype():
    cfg = transformers.AXK2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=16,
        v_head_dim=16, qk_nope_head_dim=16, head_dim=16, index_topk=8, index_head_dim=16,
        index_n_heads=4, mlp_layer_types=["dense", "dense"], max_position_embeddings=64,
        use_cache=False, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    model = transformers.AXK2ForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    data = [({"input_ids": torch.randint(0, 256, (4, 12), generator=gen)}, None)
            for _ in range(3)]
    x = {"input_ids": torch.randint(0, 256, (2, 12), generator=gen)}
    q = npr.compress(model, [npr.DynamicQuantize()], calibration=data,
                     example_inputs=x, measure=False).model
    assert sum(isinstance(m, DynamicQuantLinear) for m in q.modules()) > 20
    with torch.no_grad():  # before: AttributeError: 'DynamicQuantLinear' ... 'weight'
        assert _sqnr(model(**x).logits, q(**x).logits) > 30


def test_a_hessian_that_cannot_be_factored_is_refused_naming_the_layer():
    """Inputs around 1e-23 (a random MobileViT stage) square below float32's range: their
    float32 Hessian sums are not positive definite at any damping."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 16, generator=gen) * 1e-23, None) for _ in range(4)]
    for method in (SparseGPT(sparsity=0.5), GPTQ(bits=4, group_size=None)):
        with pytest.raises(ModelError, match=r"layer '0'.*not positive definite.*ignore="):
            npr.compress(model, [method], calibration=data, example_inputs=data[0][0],
                         measure=False)


def test_layers_the_calibration_never_calls_are_named_in_a_warning():
    """MobileBERT's output layers are read as weights (a matmul with their concatenation),
    never called: Wanda/SparseGPT/GPTQ left them dense without a word but the report's
    ``not_called``, so the model was less sparse than asked."""
    cfg = transformers.MobileBertConfig(vocab_size=512, hidden_size=64, embedding_size=32,
                                        true_hidden_size=32, intra_bottleneck_size=32,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.MobileBertForMaskedLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    data = [({"input_ids": torch.randint(3, 512, (4, 16), generator=gen)}, None)
            for _ in range(4)]
    for method in (npr.Wanda(sparsity=0.5), SparseGPT(sparsity=0.5)):
        with pytest.warns(UserWarning, match=r"2 of the \d+ selected layers were never called"
                                             r".*cls\.predictions\.dense"):
            res = npr.compress(model, [method], calibration=data, example_inputs=data[0][0],
                               measure=False)
        step = res.report["steps"][0]
        assert sorted(step["not_called"]) == ["cls.predictions.decoder", "cls.predictions.dense"]
        assert step["sparsity"] == pytest.approx(0.5, abs=1e-3)  # over the layers fitted
        dense = res.model.cls.predictions.dense.weight
        assert torch.equal(dense, model.cls.predictions.dense.weight)


def test_dynamic_quantize_prophetnet_whose_ngram_stream_reads_the_embedding_weight():
    cfg = transformers.ProphetNetConfig(
        vocab_size=512, hidden_size=64, encoder_ffn_dim=128, decoder_ffn_dim=128,
        num_encoder_layers=2, num_decoder_layers=2, num_encoder_attention_heads=4,
        num_decoder_attention_heads=4, max_position_embeddings=64, ngram=2, num_buckets=8,
        relative_max_distance=32)
    torch.manual_seed(0)
    model = transformers.ProphetNetForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    data = [({"input_ids": torch.randint(3, 512, (4, 12), generator=gen)}, None)
            for _ in range(3)]
    x = {"input_ids": torch.randint(3, 512, (2, 12), generator=gen)}
    q = npr.compress(model, [npr.DynamicQuantize()], calibration=data, example_inputs=x,
                     measure=False).model  # before: QuantEmbedding has no attribute 'weight'
    table = q.prophetnet.word_embeddings
    assert _sqnr(model.prophetnet.word_embeddings.weight, table.weight) > 35
    with torch.no_grad():
        assert _sqnr(model(**x).logits, q(**x).logits) > 30  # 40 dB
