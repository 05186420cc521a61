"""``F.scaled_dot_product_attention`` exported in netpress's lean form (``export/_sdpa.py``):
the same outputs as PyTorch for every mask kind, fully masked queries included, at other
batch sizes and lengths than the export's, and without the NaN guard over the weights."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netpress as npr
from netpress.export.onnx import OrtModule


class _Attention(nn.Module):
    """Two heads over the embeddings of ``ids [batch, seq]``; ``keep [batch, seq]`` (1 = a
    real token) gives the mask of each kind (2-D inputs: batch and length stay free)."""

    def __init__(self, kind: str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(20, 8).to(dtype)
        self.qkv = nn.Linear(8, 24).to(dtype)

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, 2, 4).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        pad = keep[:, None, None, :].bool()  # [b, 1, 1, s]: keys that are real tokens
        if self.kind == "bool":  # transformers' form: [b, 1, s, s]; padded queries see keys
            mask = pad.expand(b, 1, s, s)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.kind == "bool_rows":  # padded queries see nothing: all-masked rows
            rows = keep[:, None, :, None].bool()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=pad & rows)
        elif self.kind == "float":
            bias = (1.0 - keep[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        elif self.kind == "causal":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.kind == "scale":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=pad, scale=0.3)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, s, 8)


def _keep(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """Padding at the end of each row, one row all padding (its queries see no key in
    ``bool_rows``)."""
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    lengths[-1] = 0
    return (torch.arange(seq)[None, :] < lengths[:, None]).long()


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def _where_after_softmax(path) -> int:
    """How many ``Where`` nodes read a ``Softmax`` output (torch's NaN guard)."""
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    soft = {o for n in nodes if n.op_type == "Softmax" for o in n.output}
    return sum(1 for n in nodes if n.op_type == "Where" and soft & set(n.input))


def _matches_at(model: nn.Module, path, shapes, seed: int):
    """Export ``model`` at (2, 6); ONNX Runtime equals PyTorch (no NaN) at each (batch,
    length) of ``shapes``. Returns the path."""
    gen = torch.Generator().manual_seed(seed)
    path = npr.export_onnx(model, path, {"ids": torch.randint(0, 20, (2, 6), generator=gen),
                                         "keep": _keep(2, 6, gen)})
    ort = OrtModule(path)
    for batch, seq in shapes:
        ids, keep = torch.randint(0, 20, (batch, seq), generator=gen), _keep(batch, seq, gen)
        with torch.no_grad():
            want = model(ids, keep)
        got = ort(ids=ids, keep=keep)
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return path


@pytest.mark.parametrize("kind", ["bool", "bool_rows", "float", "causal", "scale", "none"])
def test_sdpa_export_matches_torch_at_other_shapes(tmp_path, kind):
    path = _matches_at(_Attention(kind).eval(), tmp_path / "a.onnx", ((2, 6), (3, 11), (1, 4)),
                       seed=0)
    assert "IsNaN" not in _ops(path)  # the guard over the weights is gone
    assert _where_after_softmax(path) == 0


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMax takes its axes as an input from 18
def test_fully_masked_queries_give_zeros_as_in_torch(tmp_path, opset):
    gen = torch.Generator().manual_seed(1)
    model = _Attention("bool_rows").eval()
    keep = _keep(3, 5, gen)
    path = npr.export_onnx(model, tmp_path / "a.onnx",
                           {"ids": torch.randint(0, 20, (3, 5), generator=gen), "keep": keep},
                           opset=opset)
    x = torch.randint(0, 20, (3, 5), generator=gen)
    got = OrtModule(path)(ids=x, keep=keep)
    padded = keep == 0
    assert padded.any()
    with torch.no_grad():
        torch.testing.assert_close(model(x, keep)[padded], torch.zeros_like(got[padded]))
    torch.testing.assert_close(got[padded], torch.zeros_like(got[padded]))


def test_other_dtypes_keep_torchs_form(tmp_path):
    """float64 attention goes to torch's own symbolic (and still matches)."""
    gen = torch.Generator().manual_seed(2)
    model = _Attention("bool", torch.float64).eval()
    x = torch.randint(0, 20, (2, 5), generator=gen)
    keep = _keep(2, 5, gen)
    path = npr.export_onnx(model, tmp_path / "a.onnx", {"ids": x, "keep": keep})
    assert "IsNaN" in _ops(path) and _where_after_softmax(path) == 1
    with torch.no_grad():
        torch.testing.assert_close(OrtModule(path)(ids=x, keep=keep), model(x, keep))


def test_bert_exports_without_the_nan_guard(tmp_path):
    """A tiny BERT (sdpa attention, transformers' boolean padding mask) matches PyTorch
    with padded rows, and no ``Where`` reads its attention weights."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    path = npr.export_onnx(model, tmp_path / "bert.onnx",
                           {"input_ids": ids, "attention_mask": mask})
    assert "IsNaN" not in _ops(path) and _where_after_softmax(path) == 0
    ort = OrtModule(path)
    for batch, seq in ((2, 7), (3, 12)):
        ids = torch.randint(0, 50, (batch, seq), generator=gen)
        mask = _keep(batch, seq, gen)
        mask[-1, 0] = 1  # every sequence has a token
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ort(input_ids=ids, attention_mask=mask)
        got = got[0] if isinstance(got, (tuple, list)) else got
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class _GroupedQuery(nn.Module):
    """Four query heads sharing two key/value heads, ``enable_gqa=True`` (torch's own
    symbolic refuses it)."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.embed = nn.Embedding(20, 8)
        self.q, self.kv = nn.Linear(8, 16), nn.Linear(8, 16)

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 4, 4).transpose(1, 2)
        k, v = (t.view(b, s, 2, 4).transpose(1, 2) for t in self.kv(x).chunk(2, -1))
        if self.causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            mask = keep[:, None, None, :].bool() & keep[:, None, :, None].bool()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, s, 16)


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_attention_exports(tmp_path, causal):
    _matches_at(_GroupedQuery(causal).eval(), tmp_path / "g.onnx", ((2, 6), (3, 9)), seed=4)


def test_llama_with_gqa_in_sdpa_exports(tmp_path, monkeypatch):
    """A grouped-query Llama whose attention calls SDPA with ``enable_gqa=True`` (what
    ``transformers`` does on devices with GQA kernels; forced here) exports and matches."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (2, 7), generator=gen)
    path = npr.export_onnx(model, tmp_path / "llama.onnx", {"input_ids": ids})
    ort = OrtModule(path)
    for batch, seq in ((2, 7), (1, 11)):
        ids = torch.randint(0, 64, (batch, seq), generator=gen)
        with torch.no_grad():
            want = model(input_ids=ids).logits
        got = ort(input_ids=ids)
        got = got[0] if isinstance(got, (tuple, list)) else got
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_grouped_query_attention_in_float64_goes_through_torchs_form(tmp_path):
    """Other dtypes take torch's symbolic, which refuses enable_gqa: the heads are repeated
    first."""
    model = _GroupedQuery(causal=False).double().eval()
    gen = torch.Generator().manual_seed(8)
    ids, keep = torch.randint(0, 20, (2, 6), generator=gen), _keep(2, 6, gen)
    path = npr.export_onnx(model, tmp_path / "g64.onnx", {"ids": ids, "keep": keep})
    with torch.no_grad():
        torch.testing.assert_close(OrtModule(path)(ids=ids, keep=keep), model(ids, keep))
