"""Fidelity metrics on small hand-computed logits, plus property tests."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netpress.errors import DataError
from netpress.measure.fidelity import (
    MAX_MATRIX_CLASSES,
    accuracy,
    agreement,
    classification_fidelity,
    cosine_similarity_stats,
    mean_kl,
    prediction_matrix,
    predictions,
)

# reference predicts [0, 1, 2, 0]; compressed predicts [0, 2, 2, 1]; labels [0, 1, 1, 0]
REF = torch.tensor([[2.0, 1, 0], [0, 3, 1], [1, 0, 4], [5, 1, 0]])
CMP = torch.tensor([[2.0, 1, 0], [0, 1, 3], [1, 0, 4], [0, 1, 0]])
LABELS = torch.tensor([0, 1, 1, 0])


def test_predictions_accuracy_agreement() -> None:
    assert predictions(REF).tolist() == [0, 1, 2, 0]
    assert predictions(CMP).dtype == torch.long
    assert accuracy(REF, LABELS) == pytest.approx(0.75)
    assert accuracy(CMP, LABELS) == pytest.approx(0.25)
    assert agreement(REF, CMP) == pytest.approx(0.5)
    assert agreement(REF, REF) == 1.0


def test_prediction_matrix_rows_are_reference() -> None:
    matrix = prediction_matrix(predictions(REF), predictions(CMP), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 1]]
    assert matrix.dtype == torch.long


def test_mean_kl_zero_for_identical_and_matches_direct() -> None:
    assert mean_kl(REF, REF) == pytest.approx(0.0, abs=1e-12)
    p = torch.softmax(REF.double(), -1)
    q = torch.softmax(CMP.double(), -1)
    direct = (p * (p.log() - q.log())).sum(-1).mean().item()
    assert mean_kl(REF, CMP) == pytest.approx(direct, rel=1e-9)
    p2, q2 = torch.softmax(REF.double() / 2, -1), torch.softmax(CMP.double() / 2, -1)
    direct2 = (p2 * (p2.log() - q2.log())).sum(-1).mean().item()
    assert mean_kl(REF, CMP, temperature=2.0) == pytest.approx(direct2, rel=1e-9)


def test_mean_kl_is_stable_for_extreme_logits() -> None:
    ref = torch.tensor([[1000.0, -1000.0], [0.0, 0.0]])
    cmp = torch.tensor([[-1000.0, 1000.0], [0.0, 0.0]])
    value = mean_kl(ref, cmp)
    assert math.isfinite(value)
    assert value == pytest.approx(1000.0, rel=1e-6)  # (2000 nats + 0) / 2


def test_classification_fidelity_with_labels() -> None:
    m = classification_fidelity(REF, CMP, LABELS)
    json.dumps(m)
    assert m["n"] == 4 and m["num_classes"] == 3
    assert m["reference_accuracy"] == pytest.approx(0.75)
    assert m["compressed_accuracy"] == pytest.approx(0.25)
    assert m["accuracy_drop"] == pytest.approx(0.5)
    assert m["agreement"] == pytest.approx(0.5)
    assert m["mismatches"] == 2
    assert m["mismatches_on_reference_correct"] == 2
    assert m["agreement_on_reference_correct"] == pytest.approx(1 / 3)
    assert m["prediction_matrix"] == [[1, 1, 0], [0, 0, 1], [0, 0, 1]]
    c0, c1, c2 = m["per_class"]
    assert c0 == {"class": 0, "support": 2, "agreement": 0.5, "reference_accuracy": 1.0,
                  "compressed_accuracy": 0.5, "accuracy_change": -0.5}
    assert c1 == {"class": 1, "support": 2, "agreement": 0.5, "reference_accuracy": 0.5,
                  "compressed_accuracy": 0.0, "accuracy_change": -0.5}
    assert c2["support"] == 0 and c2["agreement"] is None and c2["reference_accuracy"] is None
    assert m["worst_class_agreement"] == pytest.approx(0.5)


def test_classification_fidelity_without_labels_groups_by_reference_prediction() -> None:
    m = classification_fidelity(REF, CMP, None)
    assert m["reference_accuracy"] is None and m["compressed_accuracy"] is None
    assert m["accuracy_drop"] is None and m["agreement_on_reference_correct"] is None
    assert m["mismatches_on_reference_correct"] is None
    assert [row["support"] for row in m["per_class"]] == [2, 1, 1]
    assert [row["agreement"] for row in m["per_class"]] == [0.5, 0.0, 1.0]
    assert all(row["accuracy_change"] is None for row in m["per_class"])
    assert m["worst_class_agreement"] == 0.0


def test_prediction_matrix_omitted_for_many_classes() -> None:
    c = MAX_MATRIX_CLASSES + 1
    logits = torch.randn(5, c)
    assert classification_fidelity(logits, logits)["prediction_matrix"] is None


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: predictions(torch.randn(4)), "shape [N, C]"),
        (lambda: agreement(REF, CMP[:3]), "differ in shape"),
        (lambda: accuracy(REF, LABELS[:3]), "labels must have shape [4]"),
        (lambda: accuracy(REF, LABELS.float()), "integer class indices"),
        (lambda: classification_fidelity(REF, CMP, torch.tensor([0, 1, 5, 0])), "[0, 2]"),
        (lambda: classification_fidelity(REF, CMP, None, num_classes=5), "num_classes=5"),
        (lambda: mean_kl(REF, CMP, temperature=0.0), "temperature"),
        (lambda: predictions(torch.empty(0, 3)), "empty"),
    ],
)
def test_errors_name_the_problem(call: object, fragment: str) -> None:
    with pytest.raises(DataError, match=None) as info:
        call()  # type: ignore[operator]
    assert fragment in str(info.value)


def test_cosine_similarity_stats() -> None:
    ref = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [3.0, 4.0]])
    cmp = torch.tensor([[0.0, 1.0], [2.0, 2.0], [0.0, 0.0], [3.0, 4.0]])
    stats = cosine_similarity_stats(ref, cmp)
    assert stats["n"] == 4
    assert stats["min"] == pytest.approx(0.0, abs=1e-12)
    assert stats["mean"] == pytest.approx(0.75)  # orthogonal, parallel, both zero, equal
    assert stats["p05"] == pytest.approx(0.15)  # interpolated between 0 and 1 at 0.15
    per_token = cosine_similarity_stats(torch.randn(2, 3, 5), torch.randn(2, 3, 5))
    assert per_token["n"] == 6


logits_pairs = st.integers(1, 12).flatmap(
    lambda n: st.integers(1, 5).flatmap(
        lambda c: st.tuples(
            st.lists(st.integers(-2, 2), min_size=n * c, max_size=n * c),
            st.lists(st.integers(-2, 2), min_size=n * c, max_size=n * c),
            st.just((n, c)),
        )
    )
)


@settings(max_examples=60, deadline=None)
@given(logits_pairs)
def test_agreement_properties(pair: tuple[list[int], list[int], tuple[int, int]]) -> None:
    a_vals, b_vals, (n, c) = pair
    a = torch.tensor(a_vals, dtype=torch.float32).view(n, c)
    b = torch.tensor(b_vals, dtype=torch.float32).view(n, c)
    value = agreement(a, b)
    assert 0.0 <= value <= 1.0
    assert agreement(a, a) == 1.0
    matrix = prediction_matrix(predictions(a), predictions(b), c)
    assert int(matrix.sum()) == n
    assert int(matrix.trace()) == round(n * value)
    assert mean_kl(a, b) >= 0.0
    m = classification_fidelity(a, b)
    assert m["mismatches"] == n - int(matrix.trace())
    assert sum(row["support"] for row in m["per_class"]) == n
