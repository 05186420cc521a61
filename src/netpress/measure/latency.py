"""How long a forward pass takes, at fixed batch sizes and a fixed thread count."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from netpress._inputs import Inputs, move_to, repeat_to_batch
from netpress.errors import DataError
from netpress.measure.collect import evaluating, model_device, run_checked

__all__ = ["LatencyStats", "latency_pair_summary", "measure_latency",
           "measure_latency_interleaved"]


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock time of one forward pass, over ``repeats`` timed runs."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int
    batch_size: int
    threads: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def _summarise(times_s: list[float], batch_size: int, threads: int) -> LatencyStats:
    ms = torch.tensor(times_s, dtype=torch.float64) * 1000.0
    return LatencyStats(
        median_ms=float(torch.quantile(ms, 0.5)),
        p10_ms=float(torch.quantile(ms, 0.1)),
        p90_ms=float(torch.quantile(ms, 0.9)),
        mean_ms=float(ms.mean()),
        repeats=len(times_s),
        batch_size=batch_size,
        threads=threads,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_runs(
    model: nn.Module, inputs: Any, device: torch.device, warmup: int, repeats: int,
    min_time_s: float,
) -> list[float]:
    """Seconds per run: at least ``repeats`` runs and at least ``min_time_s`` in total."""
    for _ in range(warmup):
        run_checked(model, inputs, "the example inputs")
    _sync(device)
    times: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(times) < repeats or sum(times) < min_time_s:
            start = time.perf_counter()
            run_checked(model, inputs, "the example inputs")
            _sync(device)
            times.append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _batch_of(example_inputs: Inputs, size: int) -> Any:
    try:
        return repeat_to_batch(example_inputs, size)
    except TypeError as exc:
        raise DataError(
            f"cannot build a batch of {size} from the example inputs: {exc}; pass example "
            f"inputs with a leading batch dimension"
        ) from exc


def _check_args(batch_sizes: tuple[int, ...], threads: int, warmup: int, repeats: int) -> None:
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise DataError(f"batch_sizes must be positive integers, got {list(batch_sizes)}")
    if threads < 1:
        raise DataError(f"threads must be at least 1, got {threads}")
    if warmup < 0 or repeats < 1:
        raise DataError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, "
                        f"repeats={repeats}")


def measure_latency(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    batch_sizes: Iterable[int] = (1, 32),
    threads: int = 1,
    warmup: int = 5,
    repeats: int = 30,
    min_time_s: float = 0.0,
) -> dict[int, LatencyStats]:
    """Latency of ``model`` at each batch size, keyed by batch size.

    Batch-``N`` inputs are built from ``example_inputs`` with
    :func:`~netpress._inputs.repeat_to_batch`. The model runs in eval mode under
    ``torch.inference_mode()`` on its own device with ``torch.set_num_threads(threads)``;
    the previous thread count and training flags are restored afterwards. After ``warmup``
    untimed runs, runs are timed with ``time.perf_counter`` (garbage collection paused)
    until there are ``repeats`` of them and they total at least ``min_time_s`` seconds.
    """
    sizes = tuple(int(b) for b in batch_sizes)
    _check_args(sizes, threads, warmup, repeats)
    device = model_device(model)
    previous_threads = torch.get_num_threads()
    results: dict[int, LatencyStats] = {}
    try:
        torch.set_num_threads(threads)
        with evaluating(model), torch.inference_mode():
            for size in sizes:
                inputs = move_to(_batch_of(example_inputs, size), device)
                times = _time_runs(model, inputs, device, warmup, repeats, min_time_s)
                results[size] = _summarise(times, size, threads)
    finally:
        torch.set_num_threads(previous_threads)
    return results


def measure_latency_interleaved(
    models: Sequence[nn.Module],
    example_inputs: Inputs,
    *,
    batch_sizes: Iterable[int] = (1, 32),
    threads: int = 1,
    warmup: int = 5,
    repeats: int = 30,
    rounds: int = 5,
) -> list[dict[int, LatencyStats]]:
    """Latency of several models measured in alternating rounds, for a fair comparison.

    Timing one model fully and then the other lets drift (frequency scaling, caches, other
    load) masquerade as a speed difference. Here each batch size is timed in ``rounds``
    rounds, and every round times each model for ``repeats / rounds`` runs in turn; the
    statistics pool all runs of a model. Returns one dict per model, keyed by batch size.
    """
    sizes = tuple(int(b) for b in batch_sizes)
    _check_args(sizes, threads, warmup, repeats)
    rounds = max(1, min(rounds, repeats))
    per_round = -(-repeats // rounds)
    previous_threads = torch.get_num_threads()
    results: list[dict[int, LatencyStats]] = [{} for _ in models]
    try:
        torch.set_num_threads(threads)
        with ExitStack() as stack:
            for m in models:
                stack.enter_context(evaluating(m))
            stack.enter_context(torch.inference_mode())
            for size in sizes:
                batch = _batch_of(example_inputs, size)
                placed = [(m, model_device(m)) for m in models]
                inputs = [move_to(batch, dev) for _, dev in placed]
                times: list[list[float]] = [[] for _ in models]
                for r in range(rounds):
                    for i, (m, dev) in enumerate(placed):
                        times[i] += _time_runs(m, inputs[i], dev, warmup if r == 0 else 1,
                                               per_round, 0.0)
                for i in range(len(models)):
                    results[i][size] = _summarise(times[i], size, threads)
    finally:
        torch.set_num_threads(previous_threads)
    return results


def latency_pair_summary(reference: dict[int, LatencyStats], compressed: dict[int, LatencyStats],
                         *, threads: int, runtime: str) -> dict[str, Any]:
    """The report's latency section for a reference/compressed pair timed together.

    Medians at the smallest and largest batch size, ``speedup`` = reference / compressed
    (above 1: the compressed model is faster), every statistic under ``details``, and the
    ``runtime`` that ran them (``"eager"`` PyTorch or ``"onnxruntime"``).
    """
    small, large = min(reference), max(reference)

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    return {
        "runtime": runtime,
        "threads": threads,
        "small_batch_size": small,
        "batch_size": large,
        "reference_ms": reference[small].median_ms,
        "compressed_ms": compressed[small].median_ms,
        "reference_batch_ms": reference[large].median_ms,
        "compressed_batch_ms": compressed[large].median_ms,
        "speedup": ratio(reference[small].median_ms, compressed[small].median_ms),
        "speedup_batch": ratio(reference[large].median_ms, compressed[large].median_ms),
        "details": {
            "reference": {str(bs): s.to_dict() for bs, s in reference.items()},
            "compressed": {str(bs): s.to_dict() for bs, s in compressed.items()},
        },
    }
