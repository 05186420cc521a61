"""The compressed model as it is deployed: exported to ONNX and run by ONNX Runtime.

In eager PyTorch a quantized model runs *fake* quantization (dequantize, then a float
kernel), which is slower than the float model and is not what a deployment runs. ONNX
Runtime runs the exported QDQ graph with integer kernels, and its outputs differ a little
from the eager ones (integer rounding, fused requantization). So for a quantized model the
report measures the exported model too: its agreement in ONNX Runtime on the evaluation
data, and its latency beside the reference's FP32 export, timed in alternating rounds.

``onnx`` and ``onnxruntime`` are imported only when these functions run.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netpress.measure.collect import collect_outputs
from netpress.measure.latency import (
    LatencyStats,
    latency_pair_summary,
    measure_latency_interleaved,
)
from netpress.measure.size import _decoded

__all__ = ["float_twin", "have_onnxruntime", "is_quantized", "onnx_latency", "onnx_section"]


def have_onnxruntime() -> bool:
    """Whether ``onnx`` and ``onnxruntime`` can be imported (the ``onnx`` extra)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _is_act_quant(module: nn.Module) -> bool:
    return callable(getattr(module, "prepare_export", None)) and hasattr(module, "zero_point")


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds coded (integer) weights or activation quantizers."""
    with torch.no_grad():
        return any(_decoded(m) is not None or _is_act_quant(m) for m in model.modules())


def _float_layer(module: nn.Module, weight: torch.Tensor) -> nn.Module | None:
    bias = getattr(module, "bias", None)
    geometry: dict[str, Any] = {k: getattr(module, k, None) for k in (
        "in_features", "out_features", "in_channels", "out_channels", "kernel_size",
        "stride", "padding", "dilation", "groups")}
    layer: nn.Module
    if isinstance(geometry["in_features"], int):
        layer = nn.Linear(geometry["in_features"], geometry["out_features"],
                          bias=bias is not None)
    elif geometry["in_channels"] is not None and weight.dim() == 4:
        layer = nn.Conv2d(**{k: v for k, v in geometry.items() if "features" not in k},
                          bias=bias is not None)
    else:
        return None
    with torch.no_grad():
        layer.weight.copy_(weight)
        if layer.bias is not None and isinstance(bias, torch.Tensor):
            layer.bias.copy_(bias)
    return layer.to(weight.device)


def float_twin(model: nn.Module) -> nn.Module:
    """An FP32 copy of ``model``: coded Linear/Conv2d layers become float ones holding their
    dequantized weights and activation quantizers become ``Identity``.

    It has the compressed model's architecture and the reference's arithmetic: what the
    reference costs when no reference model is at hand (exact unless channels were removed).
    """
    twin = copy.deepcopy(model).eval()
    swaps: list[tuple[str, nn.Module]] = []
    with torch.no_grad():
        for name, module in twin.named_modules():
            weight = _decoded(module)
            if weight is not None:
                layer = _float_layer(module, weight.float())
                if layer is not None:
                    swaps.append((name, layer))
            elif _is_act_quant(module):
                swaps.append((name, nn.Identity()))
    for name, layer in swaps:
        parent, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, leaf, layer)
    return twin


def onnx_latency(paths: Sequence[str | Path], example_inputs: Any, *,
                 batch_sizes: Iterable[int] = (1, 32), threads: int = 1,
                 repeats: int = 30) -> list[dict[int, LatencyStats]]:
    """ONNX Runtime latency of each ONNX file, measured in alternating rounds
    (:func:`~netpress.measure.latency.measure_latency_interleaved` over ORT sessions with
    ``threads`` intra-op threads); one dict per file, keyed by batch size."""
    from netpress.export.onnx import OrtModule

    sessions = [OrtModule(p, threads=threads) for p in paths]
    return measure_latency_interleaved(sessions, example_inputs, batch_sizes=batch_sizes,
                                       threads=threads, repeats=repeats)


def _tensors_only(inputs: Any) -> bool:
    if isinstance(inputs, torch.Tensor):
        return True
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    return isinstance(inputs, (tuple, list, Mapping)) and all(
        isinstance(t, torch.Tensor) for t in values)


def _skip_reason(compressed: nn.Module, example_inputs: Any) -> str | None:
    if not have_onnxruntime():
        return "onnx/onnxruntime are not installed (pip install 'netpress[onnx]')"
    if not _tensors_only(example_inputs):
        return "ONNX export takes a tensor, a tuple of tensors or a dict of tensors as inputs"
    return None


def _measure(paths: list[Path], example_inputs: Any, sizes: tuple[int, ...], threads: int,
             repeats: int, data: Iterable[Any] | None, reference_outputs: torch.Tensor | None,
             compare_outputs: Callable[[torch.Tensor, torch.Tensor], dict[str, Any]] | None,
             max_batches: int | None) -> dict[str, Any]:
    from netpress.export.onnx import OrtModule

    out: dict[str, Any] = {"latency": None, "fidelity": None}
    if sizes:
        ref, cmp = onnx_latency(paths, example_inputs, batch_sizes=sizes, threads=threads,
                                repeats=repeats)
        out["latency"] = latency_pair_summary(ref, cmp, threads=threads, runtime="onnxruntime")
    if data is not None and reference_outputs is not None and compare_outputs is not None:
        exported, _ = collect_outputs(OrtModule(paths[1], threads=threads), data,
                                      max_batches=max_batches,
                                      description="evaluating the ONNX export")
        out["fidelity"] = compare_outputs(reference_outputs, exported)
    return out


def onnx_section(reference: nn.Module, compressed: nn.Module, example_inputs: Any, *,
                 data: Iterable[Any] | None = None,
                 reference_outputs: torch.Tensor | None = None,
                 compare_outputs: Callable[[torch.Tensor, torch.Tensor], dict[str, Any]]
                 | None = None,
                 batch_sizes: Iterable[int] = (1, 32), threads: int = 1, repeats: int = 30,
                 max_batches: int | None = None) -> dict[str, Any]:
    """Export ``reference`` (FP32) and ``compressed`` to ONNX and measure them in ONNX Runtime.

    Returns ``{"latency": ..., "fidelity": ..., "integer_kernels": ...}`` (``latency`` as in
    the report's eager section, plus ``runtime``; ``integer_kernels``: whether activations
    are quantized too, so that ONNX Runtime can run integer kernels, rather than weights
    only, which it dequantizes once and runs in float; ``batch_sizes=()`` skips latency), or
    ``{"skipped": reason}`` when ONNX Runtime is missing or the inputs cannot be exported.
    With ``data``, ``reference_outputs`` (the reference's eager outputs on it) and
    ``compare_outputs`` (``(reference_outputs, exported_outputs) -> metrics``, the task's),
    ``fidelity`` holds the exported model's metrics against the reference, measured in ONNX
    Runtime. This is an extra measurement: any failure (a layer the exporter does not know,
    an ONNX Runtime error) gives ``{"error": message}`` instead of failing the report.
    """
    reason = _skip_reason(compressed, example_inputs)
    if reason is not None:
        return {"skipped": reason}
    from netpress.export.onnx import export_onnx

    sizes = tuple(int(b) for b in batch_sizes)
    integer = any(_is_act_quant(m) for m in compressed.modules())
    with tempfile.TemporaryDirectory(prefix="netpress-onnx-") as tmp:
        try:
            paths = [export_onnx(m, Path(tmp) / f"{n}.onnx", example_inputs)
                     for n, m in (("reference", reference), ("compressed", compressed))]
            out = _measure(paths, example_inputs, sizes, threads, repeats, data,
                           reference_outputs, compare_outputs, max_batches)
        except Exception as exc:  # an optional measurement never fails the report
            return {"error": f"ONNX export or ONNX Runtime failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}"}
    return {**out, "integer_kernels": integer}
