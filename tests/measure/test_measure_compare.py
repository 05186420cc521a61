"""compare(): the measurement section of report.json."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import torch
from torch import nn

from netpress.measure import EmbeddingTask, compare, to_jsonable


def _pair() -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    compressed = copy.deepcopy(reference)
    with torch.no_grad():
        layer = compressed[1]
        assert isinstance(layer, nn.Linear)
        layer.weight[:, :8] = 0.0
    return reference, compressed


def _data(labeled: bool = True) -> list[tuple[torch.Tensor, Any]]:
    torch.manual_seed(1)
    return [(torch.randn(4, 4, 4), torch.randint(0, 4, (4,)) if labeled else None)
            for _ in range(2)]


def test_full_report_shape_and_json() -> None:
    reference, compressed = _pair()
    report = compare(reference, compressed, data=_data(), latency_batch_sizes=(1, 8),
                     latency_repeats=2)
    json.dumps(report, allow_nan=False)
    assert report["task"] == "classification"
    for side in ("reference", "compressed"):
        assert set(report[side]) >= {"accuracy", "params", "nonzero_params"}
        assert 0.0 <= report[side]["accuracy"] <= 1.0
    assert report["compressed"]["nonzero_params"] == 36
    assert report["agreement"] == report["fidelity"]["agreement"]
    assert report["fidelity"]["n"] == 8 and report["data"] == {"n": 8, "labeled": True}
    size = report["size"]
    assert size["ratio"] == size["reference_bytes"] / size["compressed_bytes"]
    assert report["macs"]["reference"] == 64 and report["macs"]["compressed_sparse"] == 32
    assert report["macs"]["ratio"] == 1.0
    latency = report["latency"]
    assert latency["batch_size"] == 8 and latency["threads"] == 1
    for key in ("reference_ms", "compressed_ms", "reference_batch_ms", "compressed_batch_ms",
                "speedup", "speedup_batch"):
        assert latency[key] > 0
    assert set(latency["details"]["reference"]) == {"1", "8"}
    assert latency["details"]["compressed"]["8"]["batch_size"] == 8


def test_missing_parts_are_null() -> None:
    reference, compressed = _pair()
    report = compare(reference, compressed, artefact_bytes=100)
    json.dumps(report)
    assert report["fidelity"] is None and report["agreement"] is None
    assert report["reference"]["accuracy"] is None
    assert report["macs"] is None and report["latency"] is None
    assert report["size"]["compressed_bytes"] == 100


def test_example_inputs_without_data_and_no_latency() -> None:
    reference, compressed = _pair()
    report = compare(reference, compressed, example_inputs=torch.randn(3, 16),
                     latency_batch_sizes=())
    assert report["macs"]["reference"] == 64  # per input: a batch of one
    assert report["latency"] is None


def test_unlabeled_and_embedding_tasks_have_no_accuracy() -> None:
    reference, compressed = _pair()
    unlabeled = compare(reference, compressed, data=_data(labeled=False), latency_repeats=1,
                        latency_batch_sizes=(1,))
    assert unlabeled["reference"]["accuracy"] is None
    assert 0.0 <= unlabeled["agreement"] <= 1.0
    embedding = compare(reference, compressed, data=_data(), task=EmbeddingTask(0.9),
                        latency_batch_sizes=())
    assert embedding["task"] == "embedding"
    assert embedding["compressed"]["accuracy"] is None
    assert 0.0 <= embedding["agreement"] <= 1.0


def test_function_task_outputs_are_made_json_ready() -> None:
    reference, compressed = _pair()

    def max_diff(ref: torch.Tensor, cmp: torch.Tensor, labels: Any) -> dict[Any, Any]:
        return {"max_diff": (ref - cmp).abs().max(), "per_row": (ref - cmp).abs().amax(1),
                "np": np.float32(1.5), 3: "int key", "agreement": 1.0}

    report = compare(reference, compressed, data=_data(), task=max_diff, latency_batch_sizes=())
    json.dumps(report, allow_nan=False)
    assert report["task"] == "max_diff"
    assert isinstance(report["fidelity"]["max_diff"], float)
    assert len(report["fidelity"]["per_row"]) == 8
    assert report["fidelity"]["np"] == 1.5 and report["fidelity"]["3"] == "int key"
    assert report["headline"]["max_diff"] > 0


def test_to_jsonable_handles_non_finite() -> None:
    assert to_jsonable({"a": float("inf"), "b": (1, torch.tensor(2))}) == {"a": None, "b": [1, 2]}
