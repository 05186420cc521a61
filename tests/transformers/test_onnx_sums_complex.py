"""ONNX export of what torch's exporter wrote silently wrong or refused (issue 13, third
pass): ``index_add`` / ``index_put(accumulate=True)`` with repeated indices, JetMoE's
count-list routing, and complex values (Llama 4's rotary embedding, FNet's FFT) carried as
real pairs. Every exported graph is checked against PyTorch in ONNX Runtime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netpress as npr
from netpress.testing import onnx_errors_at_shapes, token_ids

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class _IndexAdd(nn.Module):
    """``index_add`` with repeated indices (every row of ``src`` lands on ``index``'s row)."""

    def __init__(self, dim: int, alpha: float) -> None:
        super().__init__()
        self.dim, self.alpha = dim, alpha

    def forward(self, base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        return base.index_add(self.dim, index, src, alpha=self.alpha)


@pytest.mark.parametrize("dim,alpha", [(0, 1.0), (1, 2.5), (-1, 1.0)])
def test_index_add_with_repeated_indices_sums_them(tmp_path, dim, alpha):
    """torch's ONNX form kept one source per repeated row (silently wrong)."""
    from netpress.export.onnx import OrtModule

    gen = torch.Generator().manual_seed(3)
    model = _IndexAdd(dim, alpha)

    def case(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        base = torch.randn(4, 5, 6, generator=gen)
        size = list(base.shape)
        size[dim] = n
        index = torch.randint(0, base.shape[dim], (n,), generator=gen)
        index[: n // 2] = index[0]  # half the rows on one place
        return base, index, torch.randn(*size, generator=gen)

    path = npr.export_onnx(model, tmp_path / "index_add.onnx", case(8),
                           dynamic_batch=False)
    ort = OrtModule(path)
    args = case(8)
    torch.testing.assert_close(ort(*args), model(*args), rtol=1e-5, atol=1e-5)


def _jetmoe() -> nn.Module:
    if not hasattr(transformers, "JetMoeForCausalLM"):
        pytest.skip("this transformers has no JetMoE")
    cfg = transformers.JetMoeConfig(vocab_size=128, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_key_value_heads=2,
                                    kv_channels=8, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.JetMoeForCausalLM(cfg).eval()


def test_jetmoe_count_routed_experts_export_and_match(tmp_path):
    """JetMoE's router turns its expert counts into a Python list (frozen by a trace) and
    its experts sum each token's rows with index_add; both export now."""
    model = _jetmoe()
    routers = {type(m).__name__ for m in model.modules()}
    errors = onnx_errors_at_shapes(model, tmp_path / "jetmoe.onnx")
    assert max(errors) < 1e-4, errors
    assert {type(m).__name__ for m in model.modules()} == routers
    assert all("forward" not in vars(m) for m in model.modules())  # the user's model untouched


class _IndexPut(nn.Module):
    def forward(self, base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        return base.index_put((index,), src, accumulate=True)


def test_index_put_accumulate_with_repeated_indices_sums_them(tmp_path):
    from netpress.export.onnx import OrtModule

    gen = torch.Generator().manual_seed(4)
    base, src = torch.randn(5, 3, generator=gen), torch.randn(7, 3, generator=gen)
    index = torch.tensor([1, 1, 1, 4, 0, 4, 2])
    path = npr.export_onnx(_IndexPut(), tmp_path / "index_put.onnx", (base, index, src),
                           dynamic_batch=False)
    torch.testing.assert_close(OrtModule(path)(base, index, src),
                               _IndexPut()(base, index, src), rtol=1e-5, atol=1e-5)


class _ComplexRotary(nn.Module):
    """A rotary embedding in complex numbers, as Llama 4 writes it."""

    def __init__(self, misuse: bool = False) -> None:
        super().__init__()
        self.misuse = misuse
        self.inv_freq = nn.Buffer(1.0 / (100 ** (torch.arange(0, 8, 2).float() / 8)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, seq, heads, 8)
        pos = torch.arange(x.shape[1], dtype=torch.float32)
        freqs = torch.polar(torch.ones(x.shape[1], 4), pos[:, None] * self.inv_freq) * 0.9
        if self.misuse:
            freqs = torch.exp(freqs)
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3)


def test_complex_rotary_exports_as_real_pairs(tmp_path):
    from netpress.export.onnx import OrtModule

    model = _ComplexRotary()
    gen = torch.Generator().manual_seed(6)
    path = npr.export_onnx(model, tmp_path / "rotary.onnx", torch.randn(1, 5, 2, 8, generator=gen))
    for batch in (1, 3):
        x = torch.randn(batch, 5, 2, 8, generator=gen)
        torch.testing.assert_close(OrtModule(path)(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_complex_value_used_otherwise_is_refused_naming_the_call(tmp_path):
    with pytest.raises(npr.errors.ModelError, match="complex"):
        npr.export_onnx(_ComplexRotary(misuse=True), tmp_path / "r.onnx", torch.randn(1, 5, 2, 8))


def test_llama4_text_exports_and_matches(tmp_path):
    """Llama 4's complex rotary embedding (torch.polar) was refused."""
    if not hasattr(transformers, "Llama4ForCausalLM"):
        pytest.skip("this transformers has no Llama 4")
    cfg = transformers.Llama4TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, intermediate_size_mlp=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(cfg).eval()
    errors = onnx_errors_at_shapes(model, tmp_path / "llama4.onnx")
    assert max(errors) < 1e-4, errors


class _Fourier(nn.Module):
    """FFTs of a real input, chained (a pair into the second), read back as parts."""

    def __init__(self, norm: str = "backward") -> None:
        super().__init__()
        self.norm = norm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = torch.sin(ids.float()[..., None] * torch.linspace(0.1, 1.0, 6))  # (b, seq, 6)
        both = torch.fft.fftn(x, dim=(1, 2), norm=self.norm)
        chained = torch.fft.fft(torch.fft.fft(x, dim=-1), dim=1)
        return torch.cat([both.real, both.imag, chained.real - both.real], dim=-1)


def test_fft_exports_as_dft_products_at_any_length(tmp_path):
    from netpress.export.onnx import OrtModule

    model = _Fourier()
    gen = torch.Generator().manual_seed(7)
    path = npr.export_onnx(model, tmp_path / "fft.onnx",
                           {"ids": torch.randint(0, 50, (1, 6), generator=gen)})
    for batch, seq in ((1, 6), (2, 11)):
        ids = torch.randint(0, 50, (batch, seq), generator=gen)
        torch.testing.assert_close(OrtModule(path)(ids=ids), model(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(npr.errors.ModelError, match="norm"):
        npr.export_onnx(_Fourier("ortho"), tmp_path / "o.onnx",
                        {"ids": torch.randint(0, 50, (1, 6), generator=gen)})


def test_fnet_exports_and_matches(tmp_path):
    """FNet's token mixing (torch.fft.fftn(...).real) was refused on aten::fft_fftn."""
    cfg = transformers.FNetConfig(vocab_size=128, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.FNetForMaskedLM(cfg).eval()
    errors = onnx_errors_at_shapes(model, tmp_path / "fnet.onnx")
    assert max(errors) < 1e-4, errors


def test_jetmoe_int8_exports_and_matches(tmp_path):
    """DynamicQuantize swaps the router's Linear; the count routing is still made traceable."""
    from netpress.export.onnx import OrtModule

    model = _jetmoe()
    calib = [(token_ids(2, 12, s), None) for s in range(2)]
    q = npr.compress(model, [npr.DynamicQuantize()], calibration=calib,
                     example_inputs=token_ids(1, 12, 0), measure=False).model
    path = npr.export_onnx(q, tmp_path / "jetmoe_int8.onnx", token_ids(1, 12, 0))
    x = token_ids(3, 7, 9)
    with torch.no_grad():
        ref = q(**x).logits
    assert _rel(OrtModule(path)(**x), ref) < 1e-2
