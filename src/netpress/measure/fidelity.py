"""How faithful a compressed model's outputs are to the reference's.

Pure functions on output tensors: they know nothing about modules or data loaders.
Classification functions take logits of shape ``[N, C]`` (N inputs, C classes) and integer
labels of shape ``[N]``. Every fraction is in ``[0, 1]``; every result is a plain Python
``int``/``float`` (or a dict of them) so it can go straight into ``report.json``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from netpress.errors import DataError

__all__ = [
    "MAX_MATRIX_CLASSES",
    "accuracy",
    "agreement",
    "classification_fidelity",
    "cosine_distribution",
    "cosine_similarity_stats",
    "mean_kl",
    "prediction_matrix",
    "predictions",
    "row_cosines",
]

#: Above this many classes ``classification_fidelity`` leaves ``prediction_matrix`` as ``None``
#: (a 1000-class matrix would be a million numbers in ``report.json``).
MAX_MATRIX_CLASSES = 256


def _check_logits(logits: torch.Tensor, what: str = "logits") -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise DataError(f"{what} must be a tensor of shape [N, C], got {type(logits).__name__}")
    if logits.dim() != 2:
        raise DataError(
            f"{what} must have shape [N, C] (one row of class scores per input), got shape "
            f"{tuple(logits.shape)}; for embeddings or other outputs use EmbeddingTask or a "
            f"FunctionTask"
        )
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise DataError(f"{what} is empty (shape {tuple(logits.shape)}); evaluate on some inputs")
    return logits


def _check_pair(ref: torch.Tensor, cmp: torch.Tensor, what: str = "logits") -> None:
    if ref.shape != cmp.shape:
        raise DataError(
            f"reference and compressed {what} differ in shape: {tuple(ref.shape)} vs "
            f"{tuple(cmp.shape)}; both models must produce outputs of the same shape"
        )


def _check_labels(labels: torch.Tensor, n: int, num_classes: int | None = None) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise DataError(f"labels must be a tensor of class indices, got {type(labels).__name__}")
    labels = labels.reshape(-1) if labels.dim() > 1 and labels.numel() == n else labels
    if labels.dim() != 1 or labels.shape[0] != n:
        raise DataError(
            f"labels must have shape [{n}] (one class index per input), got shape "
            f"{tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise DataError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.long().cpu()
    if num_classes is not None and n > 0:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise DataError(
                f"labels must lie in [0, {num_classes - 1}] for {num_classes} classes, found "
                f"values from {low} to {high}; check the label encoding or pass num_classes"
            )
    return labels


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 class of each row of ``logits`` ``[N, C]``, as a ``LongTensor`` ``[N]``."""
    return _check_logits(logits).argmax(dim=-1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose top-1 class equals the label."""
    pred = predictions(logits)
    labels = _check_labels(labels, pred.shape[0])
    return float((pred.cpu() == labels).double().mean())


def agreement(ref_logits: torch.Tensor, cmp_logits: torch.Tensor) -> float:
    """Share of inputs where the reference and compressed top-1 classes agree."""
    _check_pair(_check_logits(ref_logits, "reference logits"),
                _check_logits(cmp_logits, "compressed logits"))
    return float((predictions(ref_logits) == predictions(cmp_logits)).double().mean())


def prediction_matrix(
    ref_pred: torch.Tensor, cmp_pred: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """``[C, C]`` counts: row = reference prediction, column = compressed prediction.

    Its sum is N and its trace is the number of agreeing inputs.
    """
    if num_classes < 1:
        raise DataError(f"num_classes must be at least 1, got {num_classes}")
    ref = _check_labels(ref_pred, int(ref_pred.numel()), num_classes)
    cmp = _check_labels(cmp_pred, int(cmp_pred.numel()), num_classes)
    _check_pair(ref, cmp, "predictions")
    flat = torch.bincount(ref * num_classes + cmp, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes)


def mean_kl(ref_logits: torch.Tensor, cmp_logits: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean over inputs of ``KL(p_ref || p_cmp)`` with ``p = softmax(logits / temperature)``.

    Computed in float64 from ``log_softmax`` (no ``log(0)``). Not multiplied by
    ``temperature**2`` (that factor is a distillation-loss convention, not a divergence).
    """
    if temperature <= 0:
        raise DataError(f"temperature must be positive, got {temperature}")
    _check_pair(_check_logits(ref_logits, "reference logits"),
                _check_logits(cmp_logits, "compressed logits"))
    log_p = F.log_softmax(ref_logits.double() / temperature, dim=-1)
    log_q = F.log_softmax(cmp_logits.double().to(log_p.device) / temperature, dim=-1)
    per_input = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)
    return max(0.0, float(per_input.mean()))


def _fraction(count: torch.Tensor | int, total: torch.Tensor | int) -> float | None:
    total_i = int(total)
    return None if total_i == 0 else int(count) / total_i


def _per_class(
    group: torch.Tensor,
    agree: torch.Tensor,
    ref_correct: torch.Tensor | None,
    cmp_correct: torch.Tensor | None,
    num_classes: int,
) -> list[dict[str, Any]]:
    def counts(mask: torch.Tensor) -> list[int]:
        return torch.bincount(group[mask], minlength=num_classes).tolist()

    support = torch.bincount(group, minlength=num_classes).tolist()
    agreeing = counts(agree)
    ref_ok = counts(ref_correct) if ref_correct is not None else None
    cmp_ok = counts(cmp_correct) if cmp_correct is not None else None
    rows: list[dict[str, Any]] = []
    for c in range(num_classes):
        ref_acc = _fraction(ref_ok[c], support[c]) if ref_ok is not None else None
        cmp_acc = _fraction(cmp_ok[c], support[c]) if cmp_ok is not None else None
        change = None if ref_acc is None or cmp_acc is None else cmp_acc - ref_acc
        rows.append({
            "class": c,
            "support": int(support[c]),
            "agreement": _fraction(agreeing[c], support[c]),
            "reference_accuracy": ref_acc,
            "compressed_accuracy": cmp_acc,
            "accuracy_change": change,
        })
    return rows


def classification_fidelity(
    ref_logits: torch.Tensor,
    cmp_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Every classification fidelity metric, as a JSON-ready dict.

    Keys: ``n``, ``num_classes``, ``reference_accuracy``, ``compressed_accuracy``,
    ``accuracy_drop`` (reference minus compressed, as a fraction), ``agreement``,
    ``mismatches`` (inputs whose top-1 differs), ``mismatches_on_reference_correct`` and
    ``agreement_on_reference_correct`` (restricted to inputs the reference got right),
    ``kl_mean``, ``per_class``, ``worst_class_agreement`` and ``prediction_matrix``.
    Label-dependent values are ``None`` when ``labels`` is ``None``.

    ``per_class`` has one entry per class ``c``. Inputs are grouped by their **true label**
    when labels are given, otherwise by the **reference prediction**; ``support`` is the group
    size. A class with no support has ``None`` agreement/accuracies. ``accuracy_change`` is
    compressed minus reference accuracy (negative = worse). ``worst_class_agreement`` is the
    lowest agreement over classes with support. ``prediction_matrix`` (rows = reference
    prediction, columns = compressed prediction) is ``None`` above :data:`MAX_MATRIX_CLASSES`.
    """
    _check_pair(_check_logits(ref_logits, "reference logits"),
                _check_logits(cmp_logits, "compressed logits"))
    n, width = int(ref_logits.shape[0]), int(ref_logits.shape[1])
    if num_classes is None:
        num_classes = width
    if num_classes != width:
        raise DataError(
            f"num_classes={num_classes} but the logits have {width} columns; pass the number "
            f"of output classes of the model (or leave num_classes unset)"
        )
    ref_pred, cmp_pred = predictions(ref_logits).cpu(), predictions(cmp_logits).cpu()
    agree = ref_pred == cmp_pred
    ref_correct = cmp_correct = None
    if labels is not None:
        labels = _check_labels(labels, n, num_classes)
        ref_correct, cmp_correct = ref_pred == labels, cmp_pred == labels
    group = labels if labels is not None else ref_pred
    per_class = _per_class(group, agree, ref_correct, cmp_correct, num_classes)
    class_agreements = [row["agreement"] for row in per_class if row["agreement"] is not None]
    metrics: dict[str, Any] = {
        "n": n,
        "num_classes": num_classes,
        "reference_accuracy": None,
        "compressed_accuracy": None,
        "accuracy_drop": None,
        "agreement": _fraction(agree.sum(), n),
        "mismatches": int((~agree).sum()),
        "mismatches_on_reference_correct": None,
        "agreement_on_reference_correct": None,
        "kl_mean": mean_kl(ref_logits, cmp_logits),
        "per_class": per_class,
        "worst_class_agreement": min(class_agreements),
        "prediction_matrix": None,
    }
    if ref_correct is not None and cmp_correct is not None:
        ref_acc, cmp_acc = _fraction(ref_correct.sum(), n), _fraction(cmp_correct.sum(), n)
        assert ref_acc is not None and cmp_acc is not None
        metrics.update(
            reference_accuracy=ref_acc,
            compressed_accuracy=cmp_acc,
            accuracy_drop=ref_acc - cmp_acc,
            mismatches_on_reference_correct=int((ref_correct & ~agree).sum()),
            agreement_on_reference_correct=_fraction((ref_correct & agree).sum(),
                                                     ref_correct.sum()),
        )
    if num_classes <= MAX_MATRIX_CLASSES:
        metrics["prediction_matrix"] = prediction_matrix(ref_pred, cmp_pred, num_classes).tolist()
    return metrics


def _quantile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile of a 1-D tensor (no size limit, unlike torch.quantile)."""
    ordered = values.double().sort().values
    pos = q * (ordered.numel() - 1)
    low = int(pos)
    high = min(low + 1, ordered.numel() - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (pos - low))


def row_cosines(ref: torch.Tensor, cmp: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows, ``[rows]`` float64.

    Outputs are viewed as rows of their last dimension: ``[N, D]`` gives N rows, ``[N, T, D]``
    gives ``N * T`` rows (one per token). Two all-zero rows count as identical (cosine 1).
    """
    if not isinstance(ref, torch.Tensor) or not isinstance(cmp, torch.Tensor):
        raise DataError("embeddings must be tensors")
    _check_pair(ref, cmp, "embeddings")
    if ref.dim() == 0 or ref.numel() == 0:
        raise DataError(f"embeddings are empty or scalar (shape {tuple(ref.shape)})")
    if ref.dim() == 1:
        ref, cmp = ref.unsqueeze(-1), cmp.unsqueeze(-1)
    a = ref.reshape(-1, ref.shape[-1]).double().cpu()
    b = cmp.reshape(-1, cmp.shape[-1]).double().cpu()
    cos = F.cosine_similarity(a, b, dim=-1, eps=1e-12)
    both_zero = (a.abs().sum(-1) == 0) & (b.abs().sum(-1) == 0)
    return torch.where(both_zero, torch.ones_like(cos), cos)


def cosine_similarity_stats(ref: torch.Tensor, cmp: torch.Tensor) -> dict[str, Any]:
    """``{"n", "mean", "min", "p05"}`` of the row cosine similarities (see :func:`row_cosines`)."""
    cos = row_cosines(ref, cmp)
    return {
        "n": int(cos.numel()),
        "mean": float(cos.mean()),
        "min": float(cos.min()),
        "p05": _quantile(cos, 0.05),
    }


#: Cosine thresholds whose shares every embedding report lists (beside the user's own).
COSINE_THRESHOLDS = (0.9, 0.95, 0.99, 0.999)


def cosine_distribution(cos: torch.Tensor, threshold: float, *, bins: int = 30
                        ) -> dict[str, Any]:
    """The distribution of row cosines ``cos`` (1-D), JSON-ready.

    ``quantiles`` (``min``, ``p01``, ``p05``, ``p25``, ``median``, ``p75``, ``max``),
    ``share_at_least``: the share of rows with cosine ``>= t`` for each ``t`` of
    :data:`COSINE_THRESHOLDS` and ``threshold`` (keys are the thresholds as text), and
    ``histogram``: ``edges`` (``bins + 1`` from ``low``, the 1st percentile, to ``high``,
    the larger of the maximum and ``threshold`` (at most 1), so that the bins resolve the
    bulk of the rows and a threshold above them is on the axis), ``counts`` per bin and
    ``below``: rows under ``low``.
    """
    if bins < 1:
        raise DataError(f"bins must be at least 1, got {bins}")
    values = cos.reshape(-1).double().cpu()
    if values.numel() == 0:
        raise DataError("no cosine values to summarise")
    quantiles = {"min": float(values.min()), "p01": _quantile(values, 0.01),
                 "p05": _quantile(values, 0.05), "p25": _quantile(values, 0.25),
                 "median": _quantile(values, 0.5), "p75": _quantile(values, 0.75),
                 "max": float(values.max())}
    shares = {str(t): float((values >= t).double().mean())
              for t in sorted({*COSINE_THRESHOLDS, float(threshold)})}
    top = max(quantiles["max"], min(float(threshold), 1.0))
    low = quantiles["p01"]
    low = low if low < top else top - 1e-6
    edges = torch.linspace(low, top, bins + 1, dtype=torch.float64)
    inside = values[values >= low]
    counts = torch.histc(inside, bins=bins, min=low, max=top)
    return {"quantiles": quantiles, "share_at_least": shares,
            "histogram": {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()],
                          "below": int((values < low).sum())}}
