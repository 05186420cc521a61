"""Activation maps as an edge runtime holds them: per-layer sparsity and entropy-coded bytes.

Activation-map compression (Georgiadis, "Accelerating Convolutional Neural Networks via
Activation Map Compression", CVPR 2019) stores each activation map quantized to 8 or 16 bits
and entropy-coded; sparse maps (see the ``act_sparsity=`` recovery term) code to fewer bytes,
which is the working memory and bandwidth the runtime needs per input.

* :func:`quantize_codes`: per-tensor dynamic quantization of one map to ``bits`` (unsigned
  when the map has no negative value, symmetric signed otherwise), as integer codes;
* :func:`coded_nbytes`: the bytes of one code array after zstd, the entropy coder of the
  ``.npress`` artefact (a frame without checksum or size fields, as a stream would send it;
  optionally with a shared zstd dictionary); activation maps use zstd's default level 3,
  the speed a runtime would afford (level 19 saves a few percent more);
* :func:`fake_quantize_dynamic`: quantize then dequantize (the values the runtime would read
  back);
* :func:`activation_section`: the report section: per selected layer, the share of exact
  zeros, bytes per input as float32 / raw codes / entropy-coded, and the model's agreement
  with a reference when every selected map is quantized to ``bits``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from netpress._inputs import call_model, move_to, primary_output
from netpress.errors import SelectionError
from netpress.measure.collect import evaluating, model_device
from netpress.select import select_names

__all__ = ["ACT_BITS", "quantize_codes", "fake_quantize_dynamic", "coded_nbytes",
           "zstd_codec", "activation_layers", "activation_section"]

ACT_BITS = (8, 16)
SCALE_BYTES = 4  # a float32 scale travels with every quantized map


def _check_bits(bits: int) -> None:
    if bits not in ACT_BITS:
        raise ValueError(f"activation bits={bits!r}; choose one of {ACT_BITS}")


def quantize_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """``(codes, scale)``: ``x`` quantized per tensor to ``bits`` (8 or 16).

    Non-negative maps (after a ReLU) use unsigned codes ``round(x / s)`` in ``[0, 2^b - 1]``
    with ``s = max / (2^b - 1)``; maps with negative values use symmetric signed codes in
    ``[-(2^(b-1) - 1), 2^(b-1) - 1]``. Zeros stay exactly zero. Codes are int32.
    """
    _check_bits(bits)
    x = x.detach().float()
    lo, hi = float(x.min()) if x.numel() else 0.0, float(x.max()) if x.numel() else 0.0
    qmax = 2 ** bits - 1 if lo >= 0 else 2 ** (bits - 1) - 1
    peak = max(abs(lo), abs(hi))
    scale = peak / qmax if peak > 0 else 1.0
    codes = torch.clamp(torch.round(x / scale), -qmax if lo < 0 else 0, qmax)
    return codes.to(torch.int32), scale


def fake_quantize_dynamic(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` rounded to its per-tensor ``bits``-bit grid (each row of the batch its own)."""
    if x.dim() == 0:
        return x
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        codes, scale = quantize_codes(x[i], bits)
        out[i] = (codes.float() * scale).to(x.dtype)
    return out


def zstd_codec(level: int = 19, dictionary: bytes | None = None) -> Any:
    """A zstd compressor writing bare frames (no checksum, content size or dictionary id)."""
    import zstandard

    kwargs: dict[str, Any] = {"level": level, "write_checksum": False,
                              "write_content_size": False, "write_dict_id": False}
    if dictionary is not None:
        kwargs["dict_data"] = zstandard.ZstdCompressionDict(dictionary)
    return zstandard.ZstdCompressor(**kwargs)


def coded_nbytes(codes: np.ndarray | torch.Tensor, bits: int = 8, *,
                 codec: Any = None) -> int:
    """Bytes of one code array after zstd (codes stored as ``bits``-bit little-endian ints)."""
    arr = codes.numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    signed = bool((arr < 0).any())
    dtype = {(8, False): np.uint8, (8, True): np.int8,
             (16, False): np.uint16, (16, True): np.int16}[(bits, signed)]
    raw = np.ascontiguousarray(arr.astype(dtype)).tobytes()
    return len((codec or zstd_codec()).compress(raw))


def activation_layers(model: nn.Module, layers: Sequence[str], owner: str = "activations"
                      ) -> list[str]:
    """Module names whose outputs count as activation maps: ``layers`` (names or ``re:``
    patterns), else every ReLU-like module (error if there is none)."""
    from netpress.recover.regularizers import ACTIVATION_TYPES

    names = [n for n, _ in model.named_modules() if n]
    if layers:
        return select_names(names, layers, (), owner=owner, what="module")
    chosen = [n for n in names if isinstance(model.get_submodule(n), ACTIVATION_TYPES)]
    if not chosen:
        raise SelectionError(f"{owner}: the model has no activation module (ReLU, GELU, ...); "
                             f"name the modules whose outputs to measure (layers=[...])")
    return chosen


class _Recorder:
    """Forward hooks that measure (and, with ``quantize``, replace) the selected outputs."""

    def __init__(self, model: nn.Module, names: list[str], bits: Sequence[int],
                 quantize: int | None, level: int = 3) -> None:
        self.names, self.bits, self.quantize = names, tuple(bits), quantize
        self.stats = {n: {"elements": 0, "zeros": 0, "inputs": 0,
                          **{f"coded_{b}": 0 for b in self.bits}} for n in names}
        self.codec = zstd_codec(level)
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n))
                        for n in names]

    def _hook(self, name: str) -> Any:
        def hook(_m: nn.Module, _args: Any, out: Any) -> Any:
            if not isinstance(out, torch.Tensor) or out.dim() == 0:
                return None
            if self.quantize is not None:
                return fake_quantize_dynamic(out, self.quantize)
            st = self.stats[name]
            st["elements"] += out.numel()
            st["zeros"] += int((out == 0).sum())
            st["inputs"] += out.shape[0]
            st["per_input"] = out[0].numel()
            for i in range(out.shape[0]):
                for b in self.bits:
                    codes, _ = quantize_codes(out[i], b)
                    st[f"coded_{b}"] += coded_nbytes(codes, b, codec=self.codec) + SCALE_BYTES
            return None

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _run(model: nn.Module, data: Iterable[Any], max_batches: int | None) -> torch.Tensor:
    device = model_device(model)
    outs = []
    with torch.no_grad(), evaluating(model):
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            outs.append(primary_output(call_model(model, move_to(inputs, device))).float().cpu())
    return torch.cat(outs)


def activation_section(model: nn.Module, data: Iterable[Any], *, layers: Sequence[str] = (),
                       bits: Sequence[int] = ACT_BITS, reference: nn.Module | None = None,
                       max_batches: int | None = 4, level: int = 3) -> dict[str, Any]:
    """Per-layer activation sparsity and entropy-coded bytes per input, JSON-ready.

    ``layers`` selects the maps (see :func:`activation_layers`); ``max_batches`` bounds the
    pass over ``data``. With ``reference``, ``agreement_quantized[b]`` is the top-1
    agreement with the reference when every selected map is quantized to ``b`` bits (and
    ``agreement`` without quantization).
    """
    for b in bits:
        _check_bits(b)
    names = activation_layers(model, layers)
    rec = _Recorder(model, names, bits, None, level)
    try:
        plain = _run(model, data, max_batches)
    finally:
        rec.remove()
    per_layer = []
    for n in names:
        st = rec.stats[n]
        k = max(1, st["inputs"])
        per_layer.append({"layer": n, "elements_per_input": st.get("per_input", 0),
                          "sparsity": st["zeros"] / max(1, st["elements"]),
                          "float32_bytes": 4 * st.get("per_input", 0),
                          **{f"bytes_{b}bit": st[f"coded_{b}"] / k for b in bits}})
    out: dict[str, Any] = {
        "layers": per_layer, "inputs": int(plain.shape[0]), "bits": list(bits), "zstd_level": level,
        "float32_bytes_per_input": sum(r["float32_bytes"] for r in per_layer),
        **{f"bytes_per_input_{b}bit": sum(r[f"bytes_{b}bit"] for r in per_layer)
           for b in bits},
        "mean_sparsity": float(np.mean([r["sparsity"] for r in per_layer])),
    }
    if reference is not None:
        ref = _run(reference, data, max_batches).argmax(-1)
        out["agreement"] = float((plain.argmax(-1) == ref).float().mean())
        out["agreement_quantized"] = {}
        for b in bits:
            q = _Recorder(model, names, (), b)
            try:
                pred = _run(model, data, max_batches).argmax(-1)
            finally:
                q.remove()
            out["agreement_quantized"][str(b)] = float((pred == ref).float().mean())
    return out
