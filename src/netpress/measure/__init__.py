"""Everything netpress measures: fidelity, size, MACs and latency.

* :mod:`~netpress.measure.fidelity`: pure metrics on output tensors (accuracy, agreement, KL...).
* :mod:`~netpress.measure.tasks`: what "faithful" means for an output kind (:class:`Task`).
* :mod:`~netpress.measure.text`: language models (perplexity, next-token agreement, KL, top-5),
  sentence encoders (cosine, retrieval agreement), with padding masked out.
* :mod:`~netpress.measure.collect`: run models over ``(inputs, labels)`` batches.
* :mod:`~netpress.measure.size`, :mod:`~netpress.measure.macs`,
  :mod:`~netpress.measure.latency`: cost of a model.
* :func:`compare`: all of the above for a reference/compressed pair, JSON-ready.
* :mod:`~netpress.measure.constraints`: ``MinAgreement``, ``MaxAccuracyDrop``,
  ``MaxClassAgreementDrop``, read from a measured report.
"""

from __future__ import annotations

from netpress.measure.collect import collect_outputs, collect_pair
from netpress.measure.compare import compare, to_jsonable
from netpress.measure.constraints import (
    Constraint,
    ConstraintResult,
    MaxAccuracyDrop,
    MaxClassAgreementDrop,
    MinAgreement,
    check_all,
)
from netpress.measure.fidelity import (
    accuracy,
    agreement,
    classification_fidelity,
    cosine_similarity_stats,
    mean_kl,
    prediction_matrix,
    predictions,
)
from netpress.measure.latency import LatencyStats, measure_latency, measure_latency_interleaved
from netpress.measure.longtail import (
    class_churn,
    confidence_shift,
    feldman_memorization,
    flipped_indices,
    long_tail_summary,
    memorization_estimate,
    mismatch_by_difficulty,
    rank_correlation,
    reference_loss,
    reference_margin,
)
from netpress.measure.macs import count_macs, count_sparse_macs, layer_macs
from netpress.measure.size import (
    file_bytes,
    nonzero_parameter_count,
    parameter_count,
    state_dict_bytes,
)
from netpress.measure.tasks import (
    ClassificationTask,
    EmbeddingTask,
    FunctionTask,
    Task,
    as_task,
)
from netpress.measure.text import LanguageModelTask, SentenceEmbeddingTask

__all__ = [
    "class_churn",
    "confidence_shift",
    "feldman_memorization",
    "flipped_indices",
    "long_tail_summary",
    "memorization_estimate",
    "mismatch_by_difficulty",
    "rank_correlation",
    "reference_loss",
    "reference_margin",
    "Constraint",
    "ConstraintResult",
    "MaxAccuracyDrop",
    "MaxClassAgreementDrop",
    "MinAgreement",
    "check_all",
    "ClassificationTask",
    "LanguageModelTask",
    "SentenceEmbeddingTask",
    "EmbeddingTask",
    "FunctionTask",
    "LatencyStats",
    "Task",
    "accuracy",
    "agreement",
    "as_task",
    "classification_fidelity",
    "collect_outputs",
    "collect_pair",
    "compare",
    "cosine_similarity_stats",
    "count_macs",
    "count_sparse_macs",
    "file_bytes",
    "layer_macs",
    "mean_kl",
    "measure_latency",
    "measure_latency_interleaved",
    "nonzero_parameter_count",
    "parameter_count",
    "prediction_matrix",
    "predictions",
    "state_dict_bytes",
    "to_jsonable",
]
