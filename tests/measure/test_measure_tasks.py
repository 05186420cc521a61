"""Tasks: classification, embedding, user functions and as_task."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch

from netpress.errors import RecipeError
from netpress.measure.tasks import (
    ClassificationTask,
    EmbeddingTask,
    FunctionTask,
    Task,
    as_task,
)


def test_classification_task_metrics_and_headline() -> None:
    task = ClassificationTask()
    ref = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    cmp = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    metrics = task.compare(ref, cmp, torch.tensor([0, 1, 1]))
    for key in ("reference_accuracy", "compressed_accuracy", "agreement"):
        assert key in metrics
    assert metrics["agreement"] == pytest.approx(2 / 3)
    head = task.headline(metrics)
    assert set(head) == {"reference_accuracy", "compressed_accuracy", "agreement", "kl_mean"}
    unlabeled = task.headline(task.compare(ref, cmp, None))
    assert "reference_accuracy" not in unlabeled and "agreement" in unlabeled


def test_embedding_task_agreement_uses_threshold() -> None:
    ref = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    cmp = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 0.7]])  # last: cos 0.985
    metrics = EmbeddingTask(threshold=0.99).compare(ref, cmp, None)
    assert metrics["agreement"] == pytest.approx(0.5)  # rows 0 and 2
    assert metrics["cosine_min"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["threshold"] == 0.99
    assert EmbeddingTask(threshold=0.9).compare(ref, cmp, None)["agreement"] == 0.75
    same = EmbeddingTask().compare(ref, ref, None)
    assert same["agreement"] == 1.0 and same["cosine_mean"] == pytest.approx(1.0)
    assert same["max_abs_error"] == 0.0
    assert set(EmbeddingTask().headline(metrics)) == {"agreement", "cosine_mean", "cosine_min"}
    with pytest.raises(RecipeError, match="threshold"):
        EmbeddingTask(threshold=2.0)


def test_function_task_wraps_user_callable() -> None:
    def top1_match(ref: torch.Tensor, cmp: torch.Tensor, labels: Any) -> dict[str, Any]:
        return {"agreement": float((ref.argmax(1) == cmp.argmax(1)).float().mean()), "note": "x"}

    task = as_task(top1_match)
    assert isinstance(task, FunctionTask) and task.name == "top1_match"
    metrics = task.compare(torch.eye(3), torch.eye(3), None)
    assert metrics == {"agreement": 1.0, "note": "x"}
    assert task.headline(metrics) == {"agreement": 1.0}
    assert as_task(lambda r, c, y: {}).name == "custom"
    assert as_task(partial(top1_match)).name == "custom"
    bad = FunctionTask(lambda r, c, y: [1, 2], name="listy")  # type: ignore[arg-type,return-value]
    with pytest.raises(RecipeError, match="'listy' must return a dict"):
        bad.compare(torch.eye(2), torch.eye(2), None)


def test_as_task_variants() -> None:
    assert isinstance(as_task(None), ClassificationTask)
    assert isinstance(as_task("embedding"), EmbeddingTask)
    task = EmbeddingTask(0.5)
    assert as_task(task) is task
    assert isinstance(ClassificationTask(), Task)
    with pytest.raises(RecipeError, match="unknown task 'segmentation'"):
        as_task("segmentation")
    with pytest.raises(RecipeError, match="got int"):
        as_task(3)  # type: ignore[arg-type]


def test_cosine_distribution_by_hand() -> None:
    from netpress.measure.fidelity import cosine_distribution

    cos = torch.tensor([0.5, 0.9, 0.95, 0.99, 0.995, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    dist = cosine_distribution(cos, threshold=0.995, bins=5)
    q = dist["quantiles"]
    assert q["min"] == 0.5 and q["max"] == 1.0 and q["median"] == pytest.approx(0.9975)
    assert q["p05"] == pytest.approx(0.5 + 0.45 * 0.4)  # between the 1st and 2nd values
    assert dist["share_at_least"] == {"0.9": 0.9, "0.95": 0.8, "0.99": 0.7, "0.995": 0.6,
                                      "0.999": 0.5}
    hist = dist["histogram"]  # from p01 to the maximum: the 0.5 row falls below
    assert hist["edges"][0] == pytest.approx(0.5 + 0.4 * 0.09) and hist["edges"][-1] == 1.0
    assert sum(hist["counts"]) + hist["below"] == 10 and hist["below"] == 1
    high = cosine_distribution(torch.tensor([0.95, 0.96, 0.97], dtype=torch.float64), 0.99)
    assert high["histogram"]["edges"][-1] == 0.99  # a threshold above every row is on the axis
    assert high["share_at_least"]["0.99"] == 0.0


def test_embedding_task_reports_the_distribution_and_takes_a_threshold() -> None:
    ref = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    cmp = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 0.7]])  # cos 1, 0, 1, 0.985
    metrics = EmbeddingTask(threshold=0.98).compare(ref, cmp, None)
    assert metrics["agreement"] == 0.75
    assert metrics["cosine"]["share_at_least"]["0.98"] == 0.75
    assert metrics["cosine"]["share_at_least"]["0.99"] == 0.5
    task = as_task("embedding:0.995")
    assert isinstance(task, EmbeddingTask) and task.threshold == 0.995
    with pytest.raises(RecipeError, match="embedding:THRESHOLD with a number"):
        as_task("embedding:high")
