"""Measure a compressed model against its reference: the measurement part of ``report.json``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from netpress._inputs import Inputs, take_batch
from netpress.measure.collect import collect_many
from netpress.measure.latency import LatencyStats, measure_latency_interleaved
from netpress.measure.longtail import (
    Proxy,
    class_churn,
    confidence_shift,
    flipped_indices,
    long_tail_summary,
)
from netpress.measure.macs import count_macs, count_sparse_macs
from netpress.measure.size import nonzero_parameter_count, parameter_count, state_dict_bytes
from netpress.measure.tasks import ClassificationTask, Task, TaskFn, as_task

__all__ = ["MAX_FLIPPED_LISTED", "compare", "disagreement_sections", "to_jsonable"]

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
    return {
        "accuracy": accuracy,
        "params": parameter_count(model),
        "nonzero_params": nonzero_parameter_count(model),
    }


def _size_section(
    reference: nn.Module, compressed: nn.Module, artefact_bytes: int | None
) -> dict[str, Any]:
    ref_bytes = state_dict_bytes(reference)
    cmp_bytes = artefact_bytes if artefact_bytes is not None else state_dict_bytes(compressed)
    return {
        "reference_bytes": ref_bytes,
        "compressed_bytes": cmp_bytes,
        "compressed_source": "artefact" if artefact_bytes is not None else "state_dict",
        "ratio": _ratio(ref_bytes, cmp_bytes),
    }


def _macs_section(reference: nn.Module, compressed: nn.Module, inputs: Inputs) -> dict[str, Any]:
    one = take_batch(inputs, 1)
    ref_macs = count_macs(reference, one)
    cmp_macs = count_macs(compressed, one)
    return {
        "batch_size": 1,
        "reference": ref_macs,
        "compressed": cmp_macs,
        "compressed_sparse": count_sparse_macs(compressed, one),
        "ratio": _ratio(ref_macs, cmp_macs),
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
    small, large = min(batch_sizes), max(batch_sizes)
    return {
        "threads": threads,
        "small_batch_size": small,
        "batch_size": large,
        "reference_ms": ref[small].median_ms,
        "compressed_ms": cmp[small].median_ms,
        "reference_batch_ms": ref[large].median_ms,
        "compressed_batch_ms": cmp[large].median_ms,
        "speedup": _ratio(ref[small].median_ms, cmp[small].median_ms),
        "speedup_batch": _ratio(ref[large].median_ms, cmp[large].median_ms),
        "details": {
            "reference": {str(bs): s.to_dict() for bs, s in ref.items()},
            "compressed": {str(bs): s.to_dict() for bs, s in cmp.items()},
        },
    }


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
) -> dict[str, Any]:
    """Fidelity, size, MACs and latency of ``compressed`` against ``reference``, JSON-ready.

    Keys: ``task``, ``data`` (``n``, ``labeled``), ``reference`` / ``compressed``
    (``accuracy``, ``params``, ``nonzero_params``), ``agreement``, ``fidelity`` (the task's
    full metrics), ``headline``, ``size``, ``macs`` (per input, batch of one) and ``latency``.

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
    batchwise = getattr(task_obj, "compare_models", None)  # text tasks: per-batch, masked
    if data is not None and callable(batchwise):
        metrics, n, first_inputs = batchwise(reference, compressed, data, device=device,
                                             max_batches=max_batches)
        metrics = to_jsonable(metrics)
        data_info = {"n": n, "labeled": False}
        if example_inputs is None:
            example_inputs = take_batch(first_inputs, 1)
    elif data is not None:
        (ref_out, cmp_out), labels, first_inputs = collect_many(
            [reference, compressed], data, device=device, max_batches=max_batches,
            progress=progress, description=f"evaluating ({task_obj.name})",
        )
        metrics = to_jsonable(task_obj.compare(ref_out, cmp_out, labels))
        if isinstance(task_obj, ClassificationTask) and metrics is not None:
            metrics.update(disagreement_sections(ref_out, cmp_out, labels,
                                                 proxy=long_tail_proxy))
        data_info = {"n": int(ref_out.shape[0]), "labeled": labels is not None}
        if example_inputs is None:
            example_inputs = take_batch(first_inputs, 1)
    got = metrics or {}
    sizes = tuple(int(b) for b in latency_batch_sizes)
    report: dict[str, Any] = {
        "task": task_obj.name,
        "data": data_info,
        "reference": _model_section(reference, got.get("reference_accuracy")),
        "compressed": _model_section(compressed, got.get("compressed_accuracy")),
        "agreement": got.get("agreement"),
        "fidelity": metrics,
        "headline": task_obj.headline(metrics) if metrics is not None else None,
        "size": _size_section(reference, compressed, artefact_bytes),
        "macs": None,
        "latency": None,
    }
    if example_inputs is not None:
        report["macs"] = _macs_section(reference, compressed, example_inputs)
        if sizes:
            report["latency"] = _latency_section(
                reference, compressed, example_inputs, sizes, threads, latency_repeats
            )
    return to_jsonable(report)
