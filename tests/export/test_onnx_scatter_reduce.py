"""``Tensor.scatter_reduce`` in ONNX (``export/_scatter_reduce.py``): every reduction with
and without ``self``, repeated indices, positions nobody scatters to, ``src`` larger than
``index``, integer tensors, and TAPAS, which torch's exporter refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netpress as npr
from netpress.export.onnx import OrtModule


class _Segments(nn.Module):
    """``base.scatter_reduce(dim, index, src, how, include_self=...)`` of the inputs."""

    def __init__(self, how: str, include_self: bool, dim: int) -> None:
        super().__init__()
        self.how, self.include_self, self.dim = how, include_self, dim

    def forward(self, base: torch.Tensor, index: torch.Tensor, src: torch.Tensor
                ) -> torch.Tensor:
        return base.scatter_reduce(self.dim, index, src, self.how,
                                   include_self=self.include_self)


def _case(dtype: torch.dtype, dim: int, seed: int) -> dict[str, torch.Tensor]:
    """A 5×4 ``base``, a 3×3 ``index`` into 5 rows or 4 columns with repeats (and rows /
    columns nobody reaches), and a 4×4 ``src`` (larger than ``index``, as torch allows)."""
    gen = torch.Generator().manual_seed(seed)
    size = 5 if dim == 0 else 4
    index = torch.randint(0, size - 2, (3, 3), generator=gen)  # the last two never reached
    src = torch.randn(4, 4, generator=gen) * 3
    base = torch.randn(5, 4, generator=gen) * 3
    if not dtype.is_floating_point:
        src, base = src.round().to(dtype), base.round().to(dtype)
    return {"base": base, "index": index, "src": src}


@pytest.mark.parametrize("how", ["sum", "prod", "amax", "amin", "mean"])
@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("dim", [0, -1])
def test_scatter_reduce_matches_torch(tmp_path, how, include_self, dim):
    model = _Segments(how, include_self, dim)
    path = npr.export_onnx(model, tmp_path / "s.onnx", _case(torch.float32, dim, 0))
    ort = OrtModule(path)
    for seed in (1, 2):
        x = _case(torch.float32, dim, seed)
        torch.testing.assert_close(ort(**x), model(**x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["sum", "amax", "amin"])
def test_integer_scatter_reduce_without_self_matches_torch(tmp_path, how):
    """``amax`` / ``amin`` of integers have no identity value: the first assignment is a
    source itself."""
    model = _Segments(how, False, 0)
    x = _case(torch.int64, 0, 3)
    path = npr.export_onnx(model, tmp_path / "i.onnx", x)
    assert torch.equal(OrtModule(path)(**x), model(**x))


def test_tapas_exports_and_matches_torch(tmp_path):
    """TAPAS's segment means (``include_self=False``) were refused by torch's exporter."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.TapasConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=64,
                                   max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.TapasModel(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(1, 64, (2, 10), generator=gen),
         "token_type_ids": torch.randint(0, 2, (2, 10, 7), generator=gen)}
    ort = OrtModule(npr.export_onnx(model, tmp_path / "tapas.onnx", x))
    with torch.no_grad():
        ref = model(**x).last_hidden_state
    torch.testing.assert_close(ort(**x), ref, rtol=1e-4, atol=1e-4)
