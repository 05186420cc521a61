"""FisherPrune on the transformers classes issue 13's one-shot sweep found it failing on
(benchmarks/oneshot_coverage.py): tiny configs of each, checked by numbers."""

from __future__ import annotations

import warnings

import pytest
import torch

import netpress as npr
from netpress.errors import RecipeError
from netpress.measure.macs import count_macs

transformers = pytest.importorskip("transformers")


def _ids(batch: int, seed: int, seq: int = 16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 512, (batch, seq), generator=gen)}


def _text_data() -> list[tuple[dict[str, torch.Tensor], None]]:
    return [(_ids(8, s, seq=32), None) for s in range(16)]


def _image_data(batches: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    """``batches`` calibration batches of four random 32x32 images, the example input (one
    image of the first batch) and eight held-out images."""
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 32, 32, generator=gen), None) for _ in range(batches)]
    return data, data[0][0][:1], torch.randn(8, 3, 32, 32, generator=gen)


def _rel(model: torch.nn.Module, ref: torch.nn.Module, x: object) -> float:
    def out(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return npr._inputs.primary_output(m(**x) if isinstance(x, dict) else m(x))
    return float((out(model) - out(ref)).norm() / out(ref).norm())


def _prune(model: torch.nn.Module, x: object, data: list, **kw: object) -> npr.CompressionResult:
    return npr.compress(model, [npr.FisherPrune(**kw)], calibration=data, example_inputs=x,
                        measure=False)


def _llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=224,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_small_grouped_query_model_reaches_a_target_the_auto_floor_made_unreachable():
    """Two key/value groups a layer: keeping one keeps half the attention whatever the
    floor, so the floor the target set (0.32) left the FFN too little room and 50% MACs
    was refused. The floor is now lowered step by step until the target is met."""
    model, x, data = _llama(), _ids(1, 0), _text_data()
    res = _prune(model, x, data, macs=0.5)
    step = res.report["steps"][0]
    assert 0.49 * count_macs(model, x) <= count_macs(res.model, x) <= 0.5 * count_macs(model, x)
    assert step["min_fraction"] < 0.32
    held = _ids(4, 99)
    plain = _prune(model, x, data, macs=0.5, refit=False).model
    # 0.284, 0.353. With attention counted (2.8% of this model's MACs at 16 tokens, which
    # FFN cuts do not reduce), the FFN floors alone no longer reach 50%, so a key/value group
    # of layer 1 goes too; the FFN-only selection of the count without attention (0.179,
    # 0.184) measures 51.3% with it
    assert _rel(res.model, model, held) < 0.3 and _rel(plain, model, held) < 0.4
    with pytest.raises(RecipeError, match="floor in force: 0.320"):  # an explicit floor stays
        _prune(model, x, data, macs=0.5, min_fraction=0.32)


def test_gpt2_conv1d_heads_and_ffn_are_pruned_and_refitted_and_the_stream_kept():
    """GPT-2's Conv1D layers were not counted as readers, so its residual stream, read by
    lm_head alone among the nn.Linear layers, was taken for a prunable group: the hidden
    size was cut (the refit then crashed on a 31-wide LayerNorm; refit=False returned it).
    Conv1D layers now read and are refitted like Linear ones."""
    cfg = transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4,
                                  n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    x, data, held = _ids(1, 0), _text_data(), _ids(4, 99)
    res = _prune(model, x, data, macs=0.5)
    assert count_macs(res.model, x) <= 0.51 * count_macs(model, x)
    blocks = res.model.transformer.h
    assert all(b.ln_1.weight.shape == (64,) and b.attn.c_proj.weight.shape[1] == 64
               for b in blocks)  # the residual stream is whole
    assert blocks[0].mlp.c_fc.weight.shape[1] < 256  # FFN neurons went (Conv1D: in x out)
    step = res.report["steps"][0]
    assert step["refitted_layers"] >= 8  # the four Conv1D layers of each block, and norms
    plain = _prune(model, x, data, macs=0.5, refit=False).model
    readers = _prune(model, x, data, macs=0.5, refit_scope="readers").model
    assert _rel(res.model, model, held) < 0.2 < 0.3 < _rel(plain, model, held)  # .18, .42
    assert _rel(readers, model, held) < 0.2  # .18


def test_albert_shared_layer_is_refitted_on_all_its_calls():
    """ALBERT has one layer called at every depth: no stack of blocks (the refit failed
    with DepthPrune's error). It falls back to refitting the readers, each on all of its
    calls at once."""
    cfg = transformers.AlbertConfig(vocab_size=512, embedding_size=32, hidden_size=64,
                                    intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AlbertForMaskedLM(cfg).eval()
    x, data, held = _ids(1, 0), _text_data(), _ids(4, 99)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _prune(model, x, data, macs=0.5)
    assert any("refit_scope='readers'" in str(w.message) for w in caught)
    step = res.report["steps"][0]
    assert step["refit_scope"] == "readers" and step["refitted_layers"] == 2
    assert count_macs(res.model, x) <= 0.52 * count_macs(model, x)
    plain = _prune(model, x, data, macs=0.5, refit=False).model
    assert _rel(res.model, model, held) < 0.015 < 0.025 < _rel(plain, model, held)  # .009, .033


def test_convnext_channels_first_norms_are_left_out_of_the_norm_refit():
    """ConvNeXt's downsampling LayerNorms normalize dim 1 of NCHW maps: the norm refit
    crashed on them. They are left as they are; the channels-last ones are refitted."""
    cfg = transformers.ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1],
                                      image_size=32, num_labels=10, layer_scale_init_value=1.0)
    torch.manual_seed(0)
    model = transformers.ConvNextForImageClassification(cfg).eval()
    data, x, held = _image_data(4)
    res = _prune(model, x, data, macs=0.6)
    assert count_macs(res.model, x) <= 0.6 * count_macs(model, x)
    first = "convnext.encoder.stages.1.downsampling_layer.0"  # channels_first
    inner = "convnext.encoder.stages.1.layers.0.layernorm"  # channels_last
    params = dict(res.model.named_parameters())
    originals = dict(model.named_parameters())
    assert torch.equal(params[f"{first}.weight"], originals[f"{first}.weight"])
    assert not torch.equal(params[f"{inner}.weight"], originals[f"{inner}.weight"])
    plain = _prune(model, x, data, macs=0.6, refit=False).model
    # .072 refitted (.051 before the few-rows ridge floor of prune.fisher.few_rows_damp:
    # these 4 calibration images give the 64-wide layers few rows), .098 without a refit
    assert _rel(res.model, model, held) < 0.08 < 0.085 < _rel(plain, model, held)


def test_an_unreachable_target_says_how_far_fisherprune_can_go():
    cfg = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).eval()
    with pytest.raises(RecipeError, match=r"min_units=1, \d+\.\d% of the MACs would stay.*"
                                          r"StructuredPrune"):
        _prune(model, _ids(1, 0), _text_data()[:2], macs=0.1)


@pytest.mark.parametrize("name,text_type,ffn", [("ModernVBert", "modernbert", 96),
                                                ("UltraVBert", "ultrabert", 176)])
def test_text_input_to_a_vision_language_encoder_refits_the_readers(name, text_type, ffn):
    """The longest stack of these models is their vision tower, which text never reaches:
    the block refit refused ("not each called once per forward"). The readers are refitted
    instead; UltraVBERT's readers also lose output rows (its refit had the wrong shape)."""
    text = dict(model_type=text_type, vocab_size=512, hidden_size=64, intermediate_size=ffn,
                num_hidden_layers=2, num_attention_heads=4, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, cls_token_id=1, sep_token_id=2)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, image_size=64, patch_size=16)
    cfg = getattr(transformers, f"{name}Config")(text_config=text, vision_config=vision,
                                                 image_token_id=231)
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForMaskedLM")(cfg).eval()
    x, data, held = _ids(1, 0), _text_data(), _ids(4, 99)
    with pytest.warns(UserWarning, match="not each called once.*refit_scope='readers'"):
        res = _prune(model, x, data, macs=0.5)
    assert res.report["steps"][0]["refit_scope"] == "readers"
    assert count_macs(res.model, x) <= 0.5 * count_macs(model, x)
    plain = _prune(model, x, data, macs=0.5, refit=False).model
    assert _rel(res.model, model, held) < 0.55 < 0.62 < _rel(plain, model, held)


def test_persimmon_per_head_norms_are_left_out_of_the_norm_refit():
    """Persimmon's q/k LayerNorms normalize each head: with heads cut they see fewer
    vectors than the original's, and the norm refit crashed pairing them."""
    cfg = transformers.PersimmonConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       qk_layernorm=True, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.PersimmonForCausalLM(cfg).eval()
    x, data, held = _ids(1, 0), _text_data(), _ids(4, 99)
    res = _prune(model, x, data, macs=0.5)
    assert count_macs(res.model, x) <= 0.5 * count_macs(model, x)
    q_norm = "model.layers.0.self_attn.q_layernorm.weight"
    assert torch.equal(dict(res.model.named_parameters())[q_norm],
                       dict(model.named_parameters())[q_norm])
    plain = _prune(model, x, data, macs=0.5, refit=False).model
    assert _rel(res.model, model, held) < 0.64 < 0.68 < _rel(plain, model, held)  # .60, .70


def test_swinv2_sum_at_another_width_is_not_a_residual_target():
    """A Swin-V2 layer's output sum was taken for a residual stream whose width differs
    between the pruned and the original block: the refit crashed on the shapes."""
    cfg = transformers.Swinv2Config(image_size=32, patch_size=4, embed_dim=32, depths=[2, 2],
                                    num_heads=[2, 4], window_size=4, num_labels=10)
    torch.manual_seed(0)
    model = transformers.Swinv2ForImageClassification(cfg).eval()
    data, x, held = _image_data(8)
    res = _prune(model, x, data, macs=0.6)
    assert count_macs(res.model, x) <= 0.6 * count_macs(model, x)
    plain = _prune(model, x, data, macs=0.6, refit=False).model
    assert _rel(res.model, model, held) < 0.8 < 0.95 < _rel(plain, model, held)  # .74, 1.03
