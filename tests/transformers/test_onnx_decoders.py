"""ONNX export of transformers decoders given only ``input_ids`` (issue 13's one-shot sweep:
every decoder failed on ``aten::diff``), the ONNX forms netpress adds, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netpress as npr
from netpress.errors import ModelError

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")


def _ids(batch: int, seed: int, vocab: int = 128) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, 12), generator=gen)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _out(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return npr._inputs.primary_output(model(**x))


@pytest.mark.parametrize("dynamic", [False, True])
def test_llama_without_attention_mask_exports_and_holds_at_other_batch_sizes(tmp_path, dynamic):
    from netpress.export.onnx import OrtModule

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if dynamic:
        calib = [(_ids(2, s), None) for s in range(3)]
        model = npr.compress(model, [npr.DynamicQuantize()], calibration=calib,
                             example_inputs=_ids(1, 0), measure=False).model
    path = npr.export_onnx(model, tmp_path / "llama.onnx", _ids(1, 0))
    ort = OrtModule(path)
    assert [i.name for i in ort.session.get_inputs()] == ["input_ids"]
    for batch in (1, 3):  # before: the packed-sequence search fixed the graph to batch 1
        x = _ids(batch, 5 + batch)
        assert _rel(ort(**x), _out(model, x)) < (1e-3 if dynamic else 1e-5)


class _Ops(nn.Module):
    """torch.diff with prepend, a bool cumsum and expm1: the ops the exporter lacked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = torch.diff(x, prepend=x[:, :1] - 1, dim=-1)
        runs = (steps > 0.5).cumsum(-1)
        return torch.expm1(x) + runs + torch.diff(x, n=2, dim=1).sum(-1, keepdim=True)


def test_added_onnx_forms_compute_what_torch_does(tmp_path):
    from netpress.export.onnx import OrtModule

    x = torch.randn(2, 7)
    path = npr.export_onnx(_Ops(), tmp_path / "ops.onnx", x)
    for batch in (2, 5):
        y = torch.randn(batch, 7, generator=torch.Generator().manual_seed(batch))
        torch.testing.assert_close(OrtModule(path)(y), _Ops()(y), atol=1e-5, rtol=1e-5)
    # registered only while export_onnx runs: torch's own exporter still has no aten::diff
    # (and no empty entry is left behind, on which it answered ValueError)
    with pytest.raises(torch.onnx.errors.UnsupportedOperatorError):
        torch.onnx.export(_Ops(), (x,), str(tmp_path / "plain.onnx"), dynamo=False)


class _Routing(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.histc(x, bins=4, min=0, max=3)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.counts = _Routing()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.counts(self.proj(x).flatten())


def test_an_op_without_onnx_form_is_refused_naming_it_and_its_module(tmp_path):
    for _ in range(2):  # the second time too (no registry entry left behind by the first)
        with pytest.raises(ModelError, match=r"aten::histc.*no ONNX form for aten::histc "
                                             r"\(in module 'counts', a _Routing\).*replace"):
            npr.export_onnx(_Block(), tmp_path / "moe.onnx", torch.rand(2, 8) * 3)


class _ScatterMean(nn.Module):
    """A segment mean of integers (``scatter_reduce(reduce="mean")``: netpress's form covers
    floating point only; TAPAS's float segment reductions export, test_onnx_scatter_reduce)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = torch.tensor([0, 1, 0, 1])
        counts = (x * 10).long()
        return counts.new_zeros(x.shape[0], 2).scatter_reduce(
            1, index.expand(x.shape[0], 4), counts, "mean", include_self=False)


def test_an_exporter_limitation_is_refused_with_its_reason(tmp_path):
    with pytest.raises(ModelError, match="mean reduction.*cannot convert this model.*"
                                         "run it in PyTorch"):
        npr.export_onnx(_ScatterMean(), tmp_path / "mean.onnx", torch.randn(2, 4))


def test_encoder_decoder_exports_with_its_own_decoder_length(tmp_path):
    """Encoder and decoder inputs get separate free lengths: a graph exported with equal
    lengths runs with others, as PyTorch does."""
    from netpress.export.onnx import ort_run, ort_session

    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                d_kv=16, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(0)

    def batch(b: int, enc: int, dec: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(1, 64, (b, enc), generator=g),
                "attention_mask": torch.ones(b, enc, dtype=torch.long),
                "decoder_input_ids": torch.randint(1, 64, (b, dec), generator=g),
                "decoder_attention_mask": torch.ones(b, dec, dtype=torch.long)}

    path = tmp_path / "t5.onnx"
    npr.export_onnx(model, path, batch(1, 8, 8))
    session = ort_session(path)
    for b, enc, dec in [(2, 11, 4), (3, 5, 9)]:
        x = batch(b, enc, dec)
        with torch.no_grad():
            ref = model(**x).logits
        out = torch.from_numpy(ort_run(session, **x))
        assert out.shape == ref.shape == (b, dec, 64)
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_int8_linear_attention_with_split_pieces_of_two_ranks_runs_in_ort(tmp_path):
    """BailingHybrid's linear attention ``tensor_split``s rank-4 and rank-3 tensors and pads
    the pieces; kept as an ONNX sequence, the INT8 graph gave a rank-4 piece the pads of a
    rank-3 one and ONNX Runtime stopped on its ``Pad`` (now a list of ``Slice``s that the
    exporter unpacks, ``_symbolics._tensor_split``)."""
    from netpress.export.onnx import OrtModule

    if not hasattr(transformers, "BailingHybridConfig"):
        pytest.skip("this transformers has no BailingHybrid")
    cfg = transformers.BailingHybridConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
        kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8, num_experts=4,
        num_experts_per_token=2, num_expert_group=1, topk_group=1, first_k_dense_replace=2,
        layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "dense"],
        num_nextn_predict_layers=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.BailingHybridForCausalLM(cfg).eval()
    x = _ids(1, 0, vocab=64)
    quant = npr.compress(model, [npr.DynamicQuantize()], calibration=[(x, None)],
                         example_inputs=x, measure=False).model
    ort = OrtModule(npr.export_onnx(quant, tmp_path / "bailing.onnx", x))
    held = _ids(2, 3, vocab=64)
    assert _rel(ort(**held), _out(quant, held)) < 1e-3

