"""ONNX export of the decoder families issue 13's sweep found refused or broken (second
pass): mixture-of-experts layers (``histc`` in transformers' grouped_mm experts), interleaved
rotary embeddings (``repeat_interleave``), the sparse-attention indexers' bool ``scatter``,
negative ``permute`` dims (Falcon-H1) and ``F.rms_norm`` (DiffLlama). Every exported graph
runs in ONNX Runtime at another batch size and sequence length than it was exported with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import netpress as npr
from netpress.testing import onnx_errors_at_shapes, token_ids

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=64, pad_token_id=0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _routed(gen: torch.Generator, tokens: int, width: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An experts module's inputs: hidden rows, top-2 expert ids of 4, routing weights."""
    return (torch.randn(tokens, width, generator=gen),
            torch.randint(0, 4, (tokens, 2), generator=gen), torch.rand(tokens, 2, generator=gen))


def _matches_routed(experts: nn.Module, path: Path, routed: Any, counts: tuple[int, ...]) -> None:
    """Export ``experts`` at ``routed(counts[0])``; ONNX Runtime equals PyTorch (1e-5) at
    every token count."""
    from netpress.export.onnx import OrtModule

    ort = OrtModule(npr.export_onnx(experts, path, routed(counts[0])))
    for tokens in counts:
        args = routed(tokens)
        with torch.no_grad():
            ref = experts(*args)
        assert _rel(ort(*args), ref) < 1e-5


def _mixtral(experts: int = 4) -> nn.Module:
    cfg = transformers.MixtralConfig(**SMALL, num_local_experts=experts,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).eval()


def test_mixtral_moe_exports_and_matches_at_other_shapes(tmp_path):
    model = _mixtral()
    implementation = model.config._experts_implementation
    errors = onnx_errors_at_shapes(model, tmp_path / "mixtral.onnx")
    assert max(errors) < 1e-4, errors
    ops = {n.op_type for n in onnx.load(tmp_path / "mixtral.onnx").graph.node}
    assert "NonZero" in ops  # each expert's tokens picked in the graph, not fixed by the trace
    # the user's model is untouched: same experts implementation, no per-instance forward
    experts = model.model.layers[0].mlp.experts
    assert model.config._experts_implementation == implementation
    assert "forward" not in vars(experts)


def test_an_expert_listed_twice_by_a_token_counts_both_weights(tmp_path):
    """Hash routing (DeepSeek-V4) may give a token the same expert in two top-k slots."""
    from netpress.export._moe import traceable_experts

    model = _mixtral()
    experts = model.model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(1)

    def routed(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, index, weights = _routed(gen, tokens, 32)
        index[::3, 1] = index[::3, 0]  # every third token: one expert twice
        return hidden, index, weights

    model.config._experts_implementation = "eager"  # the reference: a loop over the slots
    _matches_routed(experts, tmp_path / "experts.onnx", routed, (9, 4, 17))
    # the traceable forward itself, in PyTorch, computes what eager does
    args = routed(11)
    with torch.no_grad():
        ref = experts(*args)
        assert traceable_experts(experts) == [""]
        torch.testing.assert_close(experts(*args), ref, rtol=1e-5, atol=1e-6)


def _wrapped_experts() -> nn.Module:
    """An experts class decorated as transformers' are, and a subclass that wraps its
    forward (as Ergo's does: work before and after ``super().forward``)."""
    moe = pytest.importorskip("transformers.integrations.moe")

    @moe.use_experts_implementation(has_gate=False, is_transposed=True)
    class Projections(nn.Module):
        def __init__(self, config: object) -> None:
            super().__init__()
            self.num_experts = 4
            self.up_proj = nn.Parameter(torch.randn(4, 8, 12) * 0.3)
            self.down_proj = nn.Parameter(torch.randn(4, 12, 8) * 0.3)
            self.act_fn = nn.ReLU()

        def forward(self, hidden: torch.Tensor, index: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:  # eager: a loop over the slots
            out = torch.zeros_like(hidden)
            for slot in range(index.shape[1]):
                for expert in range(self.num_experts):
                    rows = index[:, slot] == expert
                    mid = self.act_fn(hidden[rows] @ self.up_proj[expert])
                    out[rows] += (mid @ self.down_proj[expert]) * weights[rows, slot, None]
            return out

    class Wrapped(Projections):
        def forward(self, hidden: torch.Tensor, index: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
            out = super().forward(torch.tanh(hidden), index, torch.ones_like(weights))
            return out * weights.sum(-1, keepdim=True) + hidden

    config = transformers.PretrainedConfig()
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    return Wrapped(config).eval()


def test_an_experts_subclass_wrapping_super_forward_keeps_its_own_work(tmp_path):
    """Only the decorated class's forward becomes the traceable one; the subclass's work
    around ``super().forward`` stays (Ergo exported 0.47 off before)."""

    model = _wrapped_experts()
    cls = type(model)
    gen = torch.Generator().manual_seed(2)

    def routed(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _routed(gen, tokens, 8)

    _matches_routed(model, tmp_path / "wrapped.onnx", routed, (9, 5, 16))
    assert type(model) is cls and "forward" not in vars(model)  # the user's model untouched


@pytest.mark.parametrize("family", ["Glm", "Cohere"])
def test_interleaved_rotary_decoders_export_and_match(tmp_path, family):
    """Glm (``repeat_interleave`` on cos/sin, partial rotary: the ``cat`` refused
    "All tensors must have the same rank") and Cohere (``repeat_interleave`` on the
    frequencies: ONNX Runtime failed on a Reshape)."""
    cfg = getattr(transformers, f"{family}Config")(**SMALL)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    errors = onnx_errors_at_shapes(model, tmp_path / f"{family}.onnx")
    assert max(errors) < 1e-4, errors


class _Indexer(nn.Module):
    """The DSA indexers' key mask: ones, with the top-k keys per query set to False."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        top = scores.topk(3, dim=-1).indices
        keep = torch.ones(scores.shape, dtype=torch.bool).scatter(-1, top, False)
        return scores.masked_fill(keep, 0.0)


class _Ops(nn.Module):
    """Falcon-H1's permute with negative dims and F.rms_norm, with and without weight/eps,
    and with a shape built from the input's sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, -2, -1, 1)  # (b, 5, 6, 4)
        a = F.rms_norm(y, (4,), self.weight, 1e-5)
        b = F.rms_norm(y, (6, 4))
        c = F.rms_norm(y, (y.shape[-1],), eps=1e-6)  # sizes read in the trace (Ergo)
        return a + b + c


def test_bool_scatter_permute_and_rms_norm_export_and_match(tmp_path):
    from netpress.export.onnx import OrtModule

    path = npr.export_onnx(_Indexer(), tmp_path / "indexer.onnx", torch.randn(1, 6, 10))
    for shape in ((1, 6, 10), (3, 6, 10)):
        x = torch.randn(*shape)
        torch.testing.assert_close(OrtModule(path)(x), _Indexer()(x))
    ops = _Ops()
    path = npr.export_onnx(ops, tmp_path / "ops.onnx", torch.randn(1, 4, 5, 6))
    for batch in (1, 3):
        x = torch.randn(batch, 4, 5, 6) * 3
        with torch.no_grad():
            ref = ops(x)
        assert _rel(OrtModule(path)(x), ref) < 1e-5


def test_dynamic_sequence_frees_the_token_axis_only_for_dict_inputs(tmp_path):
    cfg = transformers.LlamaConfig(**SMALL)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()

    def dims(path: Path) -> list[list[str | int]]:
        graph = onnx.load(path).graph
        return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in (graph.input[0], graph.output[0])]

    free = npr.export_onnx(model, tmp_path / "free.onnx", token_ids(1, 12, 0))
    fixed = npr.export_onnx(model, tmp_path / "fixed.onnx", token_ids(1, 12, 0),
                            dynamic_sequence=False)
    assert dims(free) == [["batch", "sequence"], ["batch", "sequence", 128]]
    assert dims(fixed)[0] == ["batch", 12]


def test_gated_delta_rule_decoder_exports_and_matches(tmp_path):
    """Qwen3.5's linear-attention layers solve a unit lower-triangular system per chunk
    (``linalg_solve_triangular``, refused before)."""
    cfg = transformers.Qwen3_5TextConfig(
        **{**SMALL, "head_dim": 16}, linear_conv_kernel_dim=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    model = transformers.Qwen3_5ForCausalLM(cfg).eval()
    errors = onnx_errors_at_shapes(model, tmp_path / "qwen3_5.onnx")
    assert max(errors) < 1e-4, errors
    ops = {n.op_type for n in onnx.load(tmp_path / "qwen3_5.onnx").graph.node}
    assert "Trilu" in ops  # the solve's strictly lower part, in the linear-attention layer


def test_qwen3_next_linear_attention_and_experts_export_and_match(tmp_path):
    """Qwen3-Next: gated-delta-rule layers (split at traced indices by transformers 5.25,
    :func:`netpress.export._symbolics._tensor_split`) beside a mixture of experts."""
    cfg = transformers.Qwen3NextConfig(
        **{**SMALL, "head_dim": 16}, linear_conv_kernel_dim=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    model = transformers.Qwen3NextForCausalLM(cfg).eval()
    errors = onnx_errors_at_shapes(model, tmp_path / "qwen3_next.onnx")
    assert max(errors) < 1e-4, errors


class _Solve(nn.Module):
    def __init__(self, unit: bool) -> None:
        super().__init__()
        self.unit = unit

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(a, b, upper=False, unitriangular=self.unit)


@pytest.mark.parametrize("unit", [True, False])
def test_lower_triangular_solve_matches_torch(tmp_path, unit):
    from netpress.export.onnx import OrtModule

    gen = torch.Generator().manual_seed(0)

    def system(batch: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(batch, 2, n, n, generator=gen) * 0.3
        if not unit:
            a = a + torch.diag_embed(1 + torch.rand(batch, 2, n, generator=gen))
        return a.tril(), torch.randn(batch, 2, n, 5, generator=gen)

    for n in (5, 64):  # 64: the chunk size of the gated delta rule
        path = npr.export_onnx(_Solve(unit), tmp_path / f"solve{n}.onnx", system(1, n))
        for batch in (1, 3):
            a, b = system(batch, n)
            assert _rel(OrtModule(path)(a, b), _Solve(unit)(a, b)) < 1e-5


def test_an_op_of_a_newer_opset_is_refused_saying_which_opset(tmp_path):
    from netpress.errors import ModelError
    from netpress.export.onnx import OrtModule

    fold = nn.Sequential(nn.Fold(output_size=(4, 4), kernel_size=2, stride=2))
    with pytest.raises(ModelError, match=r"aten::col2im \(in module '0', a Fold\).*"
                                         r"export_onnx\(\.\.\., opset=18\)"):
        npr.export_onnx(fold, tmp_path / "fold.onnx", torch.randn(1, 12, 4))
    path = npr.export_onnx(fold, tmp_path / "fold.onnx", torch.randn(1, 12, 4), opset=18)
    x = torch.randn(3, 12, 4)
    torch.testing.assert_close(OrtModule(path)(x), fold(x))


class _SplitAt(nn.Module):
    """``tensor_split`` at indices computed from the traced sequence length (as Qwen3.5's
    linear attention does), the pieces used separately or kept as a list."""

    def __init__(self, offsets: tuple[int, ...], as_list: bool) -> None:
        super().__init__()
        self.offsets, self.as_list = offsets, as_list

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        pieces = torch.tensor_split(x, [n - k if k >= 0 else -k for k in self.offsets], dim=1)
        if self.as_list:
            return torch.cat([p.sum(1, keepdim=True) * (i + 1) for i, p in enumerate(pieces)], 1)
        first, *rest = pieces
        return torch.cat([first * 2, *rest], dim=1).unsqueeze(-1)  # (batch, sequence, 1)


@pytest.mark.parametrize("offsets", [(0,), (3,), (5, 2), (-1, 4)])
@pytest.mark.parametrize("as_list", [False, True])
def test_tensor_split_at_traced_indices_matches_torch(tmp_path, offsets, as_list):
    """Exported at length 9, run at lengths 9, 4 and 20 (indices past the end give empty
    pieces, as in torch)."""
    from netpress.export.onnx import OrtModule

    model = _SplitAt(offsets, as_list)
    gen = torch.Generator().manual_seed(0)
    path = npr.export_onnx(model, tmp_path / "split.onnx",
                           {"x": torch.randn(2, 9, generator=gen)})  # 2-D keyword: free length
    ort = OrtModule(path)
    for seq in (9, 4, 20):
        x = torch.randn(3, seq, generator=gen)
        torch.testing.assert_close(ort(x=x), model(x), rtol=1e-5, atol=1e-5)
