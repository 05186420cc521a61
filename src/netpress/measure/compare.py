"""Measure a compressed model against its reference: the measurement part of ``report.json``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from netpress._inputs import Inputs, take_batch
from netpress.measure.collect import collect_many
from netpress.measure.latency import (
    LatencyStats,
    latency_pair_summary,
    measure_latency_interleaved,
)
from netpress.measure.longtail import (
    Proxy,
    class_churn,
    confidence_shift,
    flipped_indices,
    long_tail_summary,
)
from netpress.measure.macs import macs_breakdown
from netpress.measure.sanity import input_statistics, reference_warning
from netpress.measure.size import nonzero_parameter_count, state_dict_bytes, storage_summary
from netpress.measure.tasks import ClassificationTask, Task, TaskFn, as_task

__all__ = [
    "MACS_NOTE",
    "MAX_FLIPPED_LISTED",
    "compare",
    "disagreement_sections",
    "to_jsonable",
]

#: ``fidelity.flipped`` lists at most this many flipped inputs (the first, in data order).
MAX_FLIPPED_LISTED = 200


def to_jsonable(obj: Any) -> Any:
    """``obj`` with tensors, numpy values and dataclass stats turned into plain JSON values.

    Dict keys become strings, tuples become lists, non-finite floats become ``None``
    (strict JSON has no NaN/Infinity) and unknown objects become their ``str``.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, LatencyStats):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.item() if obj.numel() == 1 and obj.dim() == 0 else obj.tolist())
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays and scalars
        return to_jsonable(obj.tolist())
    return str(obj)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _model_section(model: nn.Module, accuracy: Any) -> dict[str, Any]:
    storage = storage_summary(model)
    return {
        "accuracy": accuracy,
        "params": storage["params"],
        "nonzero_params": nonzero_parameter_count(model),
        "storage": storage,
    }


def _size_section(
    reference: nn.Module, compressed: nn.Module, artefact_bytes: int | None,
    params: tuple[int, int],
) -> dict[str, Any]:
    ref_bytes = state_dict_bytes(reference)
    cmp_bytes = artefact_bytes if artefact_bytes is not None else state_dict_bytes(compressed)
    return {
        "reference_bytes": ref_bytes,
        "compressed_bytes": cmp_bytes,
        "compressed_source": "artefact" if artefact_bytes is not None else "state_dict",
        "ratio": _ratio(ref_bytes, cmp_bytes),
        "reference_bits_per_param": _ratio(8 * ref_bytes, params[0]),
        "compressed_bits_per_param": _ratio(8 * cmp_bytes, params[1]),
    }


#: What the two MAC counts mean, as the report states it.
MACS_NOTE = ("PyTorch and ONNX Runtime run dense kernels: they execute the dense MACs, zero "
             "weights included. Only a sparse kernel could skip the MACs of zero weights; "
             "removed channels (structured pruning) lower the dense count itself.")


def _macs_section(reference: nn.Module, compressed: nn.Module, inputs: Inputs) -> dict[str, Any]:
    one = take_batch(inputs, 1)
    ref = macs_breakdown(reference, one)
    cmp = macs_breakdown(compressed, one)
    return {
        "batch_size": 1,
        "reference": ref["dense"],
        "compressed": cmp["dense"],
        "reference_nonzero": ref["nonzero"],
        "compressed_sparse": cmp["nonzero"],
        "compressed_quantized": cmp["coded"],
        "ratio": _ratio(ref["dense"], cmp["dense"]),
        "executed_by_dense_kernels": cmp["dense"],
        "note": MACS_NOTE,
    }


def disagreement_sections(
    ref_out: torch.Tensor, cmp_out: torch.Tensor, labels: torch.Tensor | None,
    *, proxy: Proxy = "margin", max_listed: int = MAX_FLIPPED_LISTED,
) -> dict[str, Any]:
    """The classification report's ``long_tail``, ``confidence_shift``, ``class_churn`` and
    ``flipped`` sections (see :mod:`netpress.measure.longtail`), JSON-ready.

    ``flipped`` holds ``count`` and, for the first ``max_listed`` flipped inputs in data
    order, their ``indices``, ``reference_pred``, ``compressed_pred`` and ``labels``
    (``None`` without labels). ``proxy="loss"`` falls back to the margin without labels.
    """
    flips = flipped_indices(ref_out, cmp_out)
    shown = flips[:max_listed]
    ref_pred, cmp_pred = ref_out.argmax(-1).cpu(), cmp_out.argmax(-1).cpu()
    used: Proxy = proxy if labels is not None else "margin"
    return to_jsonable({
        "long_tail": long_tail_summary(ref_out, cmp_out, labels, proxy=used),
        "confidence_shift": confidence_shift(ref_out, cmp_out),
        "class_churn": class_churn(ref_pred, cmp_pred, int(ref_out.shape[1])),
        "flipped": {
            "count": int(flips.numel()),
            "indices": shown.tolist(),
            "reference_pred": ref_pred[shown].tolist(),
            "compressed_pred": cmp_pred[shown].tolist(),
            "labels": None if labels is None else labels.reshape(-1).cpu()[shown].tolist(),
        },
    })


def _latency_section(
    reference: nn.Module, compressed: nn.Module, inputs: Inputs,
    batch_sizes: tuple[int, ...], threads: int, repeats: int,
) -> dict[str, Any]:
    ref, cmp = measure_latency_interleaved([reference, compressed], inputs,
                                           batch_sizes=batch_sizes, threads=threads,
                                           repeats=repeats)
    return latency_pair_summary(ref, cmp, threads=threads, runtime="eager")


def _warnings(got: dict[str, Any], labels: torch.Tensor | None, data: Any,
              first_inputs: Any, preprocessing: str | None) -> list[str]:
    from netpress.datasets import preprocessing_of

    text = reference_warning(got.get("reference_accuracy"), labels,
                             preprocessing=preprocessing or preprocessing_of(data),
                             inputs=input_statistics(first_inputs))
    return [] if text is None else [text]


def _onnx_part(reference: nn.Module, compressed: nn.Module, example_inputs: Inputs,
               task: Task, evaluated: tuple[Any, torch.Tensor, torch.Tensor | None] | None,
               sizes: tuple[int, ...], threads: int, repeats: int,
               max_batches: int | None) -> dict[str, Any]:
    from netpress.measure.deployed import onnx_section

    data, ref_out, labels = evaluated if evaluated is not None else (None, None, None)

    def metrics(ref: torch.Tensor, exported: torch.Tensor) -> dict[str, Any]:
        full = to_jsonable(task.compare(ref, exported, labels))
        return {"agreement": full.get("agreement"),
                "accuracy": full.get("compressed_accuracy"),
                "headline": task.headline(full), "n": int(exported.shape[0])}

    return to_jsonable(onnx_section(
        reference, compressed, example_inputs, data=data, reference_outputs=ref_out,
        compare_outputs=metrics, batch_sizes=sizes, threads=threads, repeats=repeats,
        max_batches=max_batches))


def _evaluate(task: Task, reference: nn.Module, compressed: nn.Module, data: Iterable[Any], *,
              device: torch.device | str, max_batches: int | None, progress: bool,
              proxy: Proxy, preprocessing: str | None) -> tuple[Any, ...]:
    """``(metrics, data_info, evaluated, warnings, first_inputs)`` of one pass over ``data``;
    ``evaluated`` is ``(data, reference_outputs, labels)`` (``None`` for a task that compares
    the models batch by batch, as the text tasks do)."""
    batchwise = getattr(task, "compare_models", None)  # text tasks: per-batch, masked
    if callable(batchwise):
        metrics, n, first_inputs = batchwise(reference, compressed, data, device=device,
                                             max_batches=max_batches)
        return to_jsonable(metrics), {"n": n, "labeled": False}, None, [], first_inputs
    (ref_out, cmp_out), labels, first_inputs = collect_many(
        [reference, compressed], data, device=device, max_batches=max_batches,
        progress=progress, description=f"evaluating ({task.name})",
    )
    metrics = to_jsonable(task.compare(ref_out, cmp_out, labels))
    if isinstance(task, ClassificationTask) and metrics is not None:
        metrics.update(disagreement_sections(ref_out, cmp_out, labels, proxy=proxy))
    warnings = _warnings(metrics or {}, labels, data, first_inputs, preprocessing)
    data_info = {"n": int(ref_out.shape[0]), "labeled": labels is not None}
    return metrics, data_info, (data, ref_out, labels), warnings, first_inputs


def compare(
    reference: nn.Module,
    compressed: nn.Module,
    *,
    data: Iterable[Any] | None = None,
    example_inputs: Inputs | None = None,
    task: Task | TaskFn | str | None = None,
    device: torch.device | str = "cpu",
    latency_batch_sizes: Iterable[int] = (1, 32),
    threads: int = 1,
    latency_repeats: int = 30,
    artefact_bytes: int | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    long_tail_proxy: Proxy = "margin",
    onnx: bool | None = None,
    preprocessing: str | None = None,
) -> dict[str, Any]:
    """Fidelity, size, MACs and latency of ``compressed`` against ``reference``, JSON-ready.

    Keys: ``task``, ``data`` (``n``, ``labeled``), ``reference`` / ``compressed``
    (``accuracy``, ``params``: parameters whatever their storage, ``nonzero_params``,
    ``storage``: bits per parameter and bytes, see
    :func:`~netpress.measure.size.storage_summary`), ``agreement``, ``fidelity`` (the task's
    full metrics), ``headline``, ``size`` (bytes and bits per parameter on disk), ``macs``
    (per input, batch of one: the dense count that dense kernels execute, and the count on
    non-zero weights that only a sparse kernel could reach), ``latency`` (eager PyTorch),
    ``onnx`` and ``warnings`` (text; e.g. a reference that scores near chance, naming the
    data's ``preprocessing``: given, or found on a built-in loader's dataset).

    ``onnx`` (default: when ``compressed`` is quantized) exports both models to ONNX and
    measures them in ONNX Runtime, the runtime a quantized model is meant for: latency
    beside the eager figures, and the exported model's fidelity on ``data``
    (:func:`~netpress.measure.deployed.onnx_section`); ``None`` otherwise.

    Without ``data`` the fidelity parts are ``None``; without ``example_inputs`` the first
    row of the first data batch stands in, and with neither ``macs`` and ``latency`` are
    ``None``. ``accuracy`` is ``None`` for unlabeled data or tasks that report none.
    ``latency_batch_sizes=()`` skips latency. ``artefact_bytes`` (the saved artefact's size)
    replaces the compressed model's ``state_dict`` size. Both models must be on ``device``
    for the data pass; MACs and latency run on each model's own device.

    For a :class:`ClassificationTask`, ``fidelity`` also holds :func:`disagreement_sections`
    (``long_tail`` with difficulty from ``long_tail_proxy``, ``confidence_shift``,
    ``class_churn`` and ``flipped``, indices in data order).
    """
    task_obj = as_task(task)
    metrics: dict[str, Any] | None = None
    data_info: dict[str, Any] | None = None
    evaluated: tuple[Any, torch.Tensor, torch.Tensor | None] | None = None
    warnings: list[str] = []
    if data is not None:
        metrics, data_info, evaluated, warnings, first_inputs = _evaluate(
            task_obj, reference, compressed, data, device=device, max_batches=max_batches,
            progress=progress, proxy=long_tail_proxy, preprocessing=preprocessing)
        if example_inputs is None:
            example_inputs = take_batch(first_inputs, 1)
    got = metrics or {}
    sizes = tuple(int(b) for b in latency_batch_sizes)
    ref_part = _model_section(reference, got.get("reference_accuracy"))
    cmp_part = _model_section(compressed, got.get("compressed_accuracy"))
    report: dict[str, Any] = {
        "task": task_obj.name,
        "data": data_info,
        "reference": ref_part,
        "compressed": cmp_part,
        "agreement": got.get("agreement"),
        "fidelity": metrics,
        "headline": task_obj.headline(metrics) if metrics is not None else None,
        "size": _size_section(reference, compressed, artefact_bytes,
                              (ref_part["params"], cmp_part["params"])),
        "macs": None,
        "latency": None,
        "onnx": None,
        "warnings": warnings,
    }
    if example_inputs is not None:
        report["macs"] = _macs_section(reference, compressed, example_inputs)
        if sizes:
            report["latency"] = _latency_section(
                reference, compressed, example_inputs, sizes, threads, latency_repeats
            )
        if onnx if onnx is not None else _quantized(compressed):
            report["onnx"] = _onnx_part(reference, compressed, example_inputs, task_obj,
                                        evaluated, sizes, threads, latency_repeats,
                                        max_batches)
    return to_jsonable(report)


def _quantized(model: nn.Module) -> bool:
    from netpress.measure.deployed import is_quantized

    return is_quantized(model)
