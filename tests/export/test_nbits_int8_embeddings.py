"""A GPTQ 4-bit encoder with int8 embedding tables (``DynamicQuantize`` after ``GPTQ``):
exported as MatMulNBits plus int8 gathers, ONNX Runtime computes what the compressed
PyTorch model computes, and the file loses the float tables."""

import onnx
import pytest
import torch
import transformers

import netpress as npr
from netpress.export.onnx import export_onnx, optimized_op_types, ort_run, ort_session
from netpress.quant.dynamic import QuantEmbedding
from netpress.reconstruct.modules import GroupQuantLinear

pytest.importorskip("onnxruntime")

EMBEDDINGS = ("re:.*embeddings.*",)


def _bert_and_text() -> tuple[torch.nn.Module, list]:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=2000, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128,
                                  max_position_embeddings=32)
    g = torch.Generator().manual_seed(0)
    data = [({"input_ids": torch.randint(0, 2000, (8, 16), generator=g),
              "attention_mask": torch.ones(8, 16, dtype=torch.long)}, None) for _ in range(3)]
    return transformers.BertModel(cfg).eval(), data


def _hidden(model: torch.nn.Module, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).last_hidden_state


def test_gptq_then_int8_embeddings_exports_matmulnbits_and_int8_gathers(tmp_path):
    model, data = _bert_and_text()
    x = data[0][0]
    gptq = npr.compress(model, [npr.GPTQ(bits=4, group_size=32)], calibration=data,
                        example_inputs=x, measure=False).model
    both = npr.compress(gptq, [npr.DynamicQuantize(layers=EMBEDDINGS, outlier_channels=0)],
                        example_inputs=x, measure=False).model
    assert sum(isinstance(m, QuantEmbedding) for m in both.modules()) == 3
    linears = sum(isinstance(m, GroupQuantLinear) for m in both.modules())
    assert linears == sum(isinstance(m, GroupQuantLinear) for m in gptq.modules()) == 13

    path = export_onnx(both, tmp_path / "both.onnx", x, nbits="matmulnbits")
    plain = export_onnx(gptq, tmp_path / "gptq.onnx", x, nbits="matmulnbits")
    # every Linear the exported output depends on (not the pooler: the first output only)
    assert optimized_op_types(path).count("MatMulNBits") == linears - 1
    tables = {t.name: t for t in onnx.load(str(path)).graph.initializer
              if t.data_type == onnx.TensorProto.INT8}
    assert any(tuple(t.dims) == (2000, 64) for t in tables.values()), "no int8 word table"

    ours = torch.from_numpy(ort_run(ort_session(path), **x))
    ref = _hidden(both, x)
    assert float((ours - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    # int8 rows cost little next to the 4-bit weights' own error
    cos = torch.nn.functional.cosine_similarity(ref.flatten(0, 1), _hidden(gptq, x).flatten(0, 1))
    assert float(cos.min()) > 0.999
    # the word table (2000 x 64 floats, 512 kB) became 128 kB of codes + 8 kB of scales
    saved = plain.stat().st_size - path.stat().st_size
    assert saved > 0.7 * 2000 * 64 * 4 * 0.75, f"only {saved} bytes smaller"
