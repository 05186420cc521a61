"""GPTQ and DynamicQuantize on a language model whose output layer is tied to its input
embedding table: the table reads the output layer's codes (one stored copy), through the
artefact, ONNX and a transformers directory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import netpress as npr
from netpress.export import dumps_artefact, load_artefact, read_header
from netpress.measure.size import parameter_count, storage_summary
from netpress.reconstruct.modules import GroupQuantEmbedding, GroupQuantLinear

transformers = pytest.importorskip("transformers")


def _tied_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _tied_gemma() -> torch.nn.Module:
    """A tied Gemma: its word embedding multiplies the lookup by sqrt(48)."""
    cfg = transformers.GemmaConfig(vocab_size=256, hidden_size=48, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.GemmaForCausalLM(cfg).eval()


def _batches(n: int = 4) -> list[tuple[dict[str, torch.Tensor], None]]:
    gen = torch.Generator().manual_seed(1)
    return [({"input_ids": torch.randint(0, 256, (4, 24), generator=gen),
              "attention_mask": torch.ones(4, 24, dtype=torch.long)}, None) for _ in range(n)]


def _logits(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


@pytest.fixture(scope="module")
def quantized() -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    model = _tied_llama()
    data = _batches()
    res = npr.compress(model, [npr.GPTQ(bits=4, group_size=16)], calibration=data,
                       example_inputs=data[0][0], measure=False)
    return model, res.model, res.report["steps"][-1]


def test_the_tied_table_reads_the_output_layers_codes(quantized) -> None:
    model, q, step = quantized
    table, head = q.model.embed_tokens, q.lm_head
    assert isinstance(table, GroupQuantEmbedding) and isinstance(head, GroupQuantLinear)
    assert table.weight_q is head.weight_q and table.weight_scale is head.weight_scale
    assert table.weight_zero is head.weight_zero
    assert step["tied_tables"] == {"lm_head": ["model.embed_tokens"]}
    ids = torch.tensor([[0, 5, 255, 17], [3, 3, 200, 1]])
    # the gather of code rows is exactly the float lookup of the dequantized table
    assert torch.equal(table(ids), F.embedding(ids, head.dequantized_weight()))
    # one weight, as in the float model: counted once, stored once at 4 bits
    assert parameter_count(q) == parameter_count(model)
    assert storage_summary(q)["formats"]["int4"] == sum(
        m.weight_q.numel() for m in q.modules() if isinstance(m, GroupQuantLinear))
    # the original is untouched and still tied
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_artefact_keeps_one_copy_and_restores_the_tie(quantized) -> None:
    _, q, _ = quantized
    blob = dumps_artefact(q)
    loaded = load_artefact(blob).model
    assert loaded.model.embed_tokens.weight_q is loaded.lm_head.weight_q
    x = _batches(1)[0][0]
    torch.testing.assert_close(_logits(loaded, x), _logits(q, x), atol=0, rtol=0)
    # stored once (4-bit packed), the output layer's tensors aliases of the table's
    metas = read_header(blob)["tensors"]
    assert metas["model.embed_tokens.weight_q"]["bits"] == 4
    for field in ("weight_q", "weight_scale", "weight_zero"):
        assert metas[f"lm_head.{field}"]["alias_of"] == f"model.embed_tokens.{field}"


def test_onnx_export_of_the_tied_table_matches(quantized, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    _, q, _ = quantized
    x = _batches(1)[0][0]
    path = tmp_path / "m.onnx"
    npr.export_onnx(q, path, x)
    import onnx

    from netpress.export.nbits_gather import gather_block_quantized_available

    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    if gather_block_quantized_available(4, 16) is None:
        assert {"GatherBlockQuantized", "MatMulNBits"} <= ops
        # the packed codes once: the table's data is a Reshape of the output layer's
        packed = [i.name for i in proto.graph.initializer if i.data_type == 2
                  and 256 * 32 == int(torch.tensor(list(i.dims)).prod())]
        assert len(packed) == 1, packed
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: x[i.name].numpy() for i in sess.get_inputs()}
    out = torch.from_numpy(sess.run(None, feed)[0])
    ref = _logits(q, x)
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_transformers_directory_is_tied_and_exact(quantized, tmp_path) -> None:
    from netpress.models.hf import save_pretrained

    _, q, _ = quantized
    save_pretrained(q, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                              local_files_only=True).eval()
    x = _batches(1)[0][0]
    torch.testing.assert_close(_logits(back, x), _logits(q, x), atol=1e-5, rtol=1e-4)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()


def test_dynamic_quantize_after_gptq_says_the_layers_are_quantized_already() -> None:
    from netpress.errors import ModelError

    model, data = _tied_llama(), _batches(1)
    with pytest.raises(ModelError, match=r"quantized already.*embed_tokens "
                                         r"\(GroupQuantEmbedding\)"):
        npr.compress(model, [npr.GPTQ(bits=4, group_size=16),
                             npr.DynamicQuantize(layers=("re:.*embed.*",), outlier_channels=0)],
                     calibration=data, example_inputs=data[0][0], measure=False)


@pytest.mark.parametrize("outliers", [0, 4])
def test_dynamic_int8_tied_table_reads_the_output_layers_codes(outliers, tmp_path) -> None:
    from netpress.quant.dynamic import DynamicQuantLinear, QuantEmbedding

    model, data = _tied_llama(), _batches(2)
    with torch.no_grad():  # an outlier input channel of the output layer, for the smoothing
        model.model.norm.weight[3] = 30.0
    res = npr.compress(model, [npr.DynamicQuantize(outlier_channels=outliers,
                                                   target="generic")],
                       calibration=data, example_inputs=data[0][0], measure=False)
    q = res.model
    table, head = q.model.embed_tokens, q.lm_head
    assert isinstance(table, QuantEmbedding) and isinstance(head, DynamicQuantLinear)
    assert table.weight_q is head.weight_q and table.weight_scale is head.weight_scale
    assert table.smoothed == head.smoothed == bool(outliers)
    if outliers:
        assert table.in_scale is head.in_scale and float(head.in_scale.min()) < 1
    ids = torch.tensor([[0, 5, 255, 17]])
    assert torch.equal(table(ids), F.embedding(ids, head.dequantized_weight()))
    # within int8 rounding of the float table
    ref = model.model.embed_tokens.weight
    assert (head.dequantized_weight() - ref).abs().max() <= 0.51 * \
        (head.weight_scale[:, None] * (head.in_scale if outliers else 1)).max()
    assert parameter_count(q) == parameter_count(model)
    loaded = load_artefact(dumps_artefact(q)).model
    assert loaded.model.embed_tokens.weight_q is loaded.lm_head.weight_q
    x = data[0][0]
    torch.testing.assert_close(_logits(loaded, x), _logits(q, x), atol=0, rtol=0)
    ort = pytest.importorskip("onnxruntime")
    import onnx

    npr.export_onnx(q, tmp_path / "m.onnx", x)
    tables = [i for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer
              if sorted(i.dims) == [64, 256]]
    assert len(tables) == 1  # the int8 codes once: the Gather reads the MatMul's layout
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {i.name: x[i.name].numpy()
                                           for i in sess.get_inputs()})[0])
    assert (out - _logits(q, x)).abs().max() <= 1e-2 * _logits(q, x).abs().max()


def test_gemma_scaled_tied_table_keeps_its_scale(tmp_path) -> None:
    """Gemma's word embedding multiplies the lookup by sqrt(hidden): the coded table keeps
    that factor, through ONNX and a transformers directory."""
    from netpress.models.hf import save_pretrained

    model = _tied_gemma()
    data = _batches(2)
    res = npr.compress(model, [npr.GPTQ(bits=4, group_size=16)], calibration=data,
                       example_inputs=data[0][0], measure=False)
    q = res.model
    table = q.model.embed_tokens
    assert isinstance(table, GroupQuantEmbedding) and table.weight_q is q.lm_head.weight_q
    assert table.scale_by == pytest.approx(48 ** 0.5, rel=1e-6)
    assert table.embed_scale.dtype == torch.float32  # read like transformers' buffer
    ids = torch.tensor([[1, 7, 200]])
    assert torch.equal(table(ids), F.embedding(ids, q.lm_head.dequantized_weight())
                       * torch.tensor(48 ** 0.5, dtype=torch.float32))
    assert parameter_count(q) == parameter_count(model)
    x = data[0][0]
    # within GPTQ's error of the float model: the scale is not lost (it is ~6.9)
    ref, out = _logits(model, x), _logits(q, x)
    assert (out - ref).abs().max() <= 0.2 * ref.abs().max()
    loaded = load_artefact(dumps_artefact(q)).model
    torch.testing.assert_close(_logits(loaded, x), out, atol=0, rtol=0)
    save_pretrained(q, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                              local_files_only=True).eval()
    torch.testing.assert_close(_logits(back, x), out, atol=1e-5, rtol=1e-4)
    ort = pytest.importorskip("onnxruntime")
    npr.export_onnx(q, tmp_path / "m.onnx", x)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {i.name: x[i.name].numpy()
                                           for i in sess.get_inputs()})[0])
    assert (got - out).abs().max() <= 1e-3 * out.abs().max()


def test_a_table_that_computes_more_than_a_scaled_lookup_is_left_float() -> None:
    from netpress.reconstruct.modules import lookup_scale

    class Shifted(torch.nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) + 1.0

    with pytest.raises(ValueError, match="more than a scaled lookup"):
        lookup_scale(Shifted(10, 4))
    assert lookup_scale(torch.nn.Embedding(10, 4)) == 1.0


def test_dynamic_int8_of_gemma_quantizes_its_scaled_table_and_keeps_the_tie() -> None:
    from netpress.quant.dynamic import QuantEmbedding

    model = _tied_gemma()
    data = _batches(2)
    q = npr.compress(model, [npr.DynamicQuantize(outlier_channels=0, target="generic")],
                     calibration=data, example_inputs=data[0][0], measure=False).model
    table = q.model.embed_tokens
    assert isinstance(table, QuantEmbedding) and table.weight_q is q.lm_head.weight_q
    assert table.scale_by == pytest.approx(48 ** 0.5, rel=1e-6)
    assert table.embed_scale.dtype == torch.float32  # read like transformers' buffer
    ids = torch.tensor([[1, 7, 200]])
    ref = model.model.embed_tokens(ids)
    assert (table(ids) - ref).abs().max() <= 0.51 * 48 ** 0.5 * float(table.weight_scale.max())
    loaded = load_artefact(dumps_artefact(q)).model
    x = data[0][0]
    torch.testing.assert_close(_logits(loaded, x), _logits(q, x), atol=0, rtol=0)


def test_positional_embedding_subclasses_are_not_taken_for_scaled_lookups() -> None:
    """OPT's learned positions take other arguments; the check says no, it does not raise."""
    from netpress.quant.lookup import scaled_lookup

    cfg = transformers.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=32,
                                 word_embed_proj_dim=32)
    model = transformers.OPTForCausalLM(cfg).eval()
    assert not scaled_lookup(model.model.decoder.embed_positions)
    assert scaled_lookup(model.model.decoder.embed_tokens)
    data = _batches(1)
    x = {k: v.clamp(max=127) for k, v in data[0][0].items()}
    q = npr.compress(model, [npr.DynamicQuantize(outlier_channels=0)], example_inputs=x,
                     measure=False).model
    assert type(q.model.decoder.embed_positions).__name__ == "OPTLearnedPositionalEmbedding"


def test_float_tied_model_exports_its_table_once(tmp_path) -> None:
    import onnx

    from netpress.export.onnx import ort_run, ort_session

    model = _tied_llama()
    x = _batches(1)[0][0]
    npr.export_onnx(model, tmp_path / "m.onnx", x)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    big = [i.name for i in proto.graph.initializer if 256 * 64 in (
        int(torch.tensor(list(i.dims)).prod()),)]
    assert len(big) == 1, big  # the table, read by the Gather and the output MatMul
    out = torch.from_numpy(ort_run(ort_session(tmp_path / "m.onnx"), **x))
    ref = _logits(model, x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the user's model as it was
