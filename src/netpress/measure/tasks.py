"""What "faithful" means for a kind of model output.

A :class:`Task` turns the reference's and the compressed model's outputs (and labels, if
any) into a metrics dict. Every built-in task reports an ``agreement`` in ``[0, 1]`` so that
constraints such as ``agreement >= 0.99`` work whatever the task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any, Protocol, runtime_checkable

import torch

from netpress.errors import RecipeError
from netpress.measure.fidelity import (
    classification_fidelity,
    cosine_distribution,
    cosine_similarity_stats,
    row_cosines,
)

__all__ = [
    "ClassificationTask",
    "EmbeddingTask",
    "FunctionTask",
    "Task",
    "TaskFn",
    "as_task",
]

TaskFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], Mapping[str, Any]]


@runtime_checkable
class Task(Protocol):
    """Compares reference and compressed outputs.

    ``compare`` returns a JSON-ready metrics dict; ``headline`` picks the few numbers shown
    in the summary table.
    """

    name: str

    def compare(
        self, ref_outputs: torch.Tensor, cmp_outputs: torch.Tensor, labels: torch.Tensor | None
    ) -> dict[str, Any]:
        """All metrics for this task."""
        ...

    def headline(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """The few numbers of ``metrics`` worth a column in the summary table."""
        ...


def _pick(metrics: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    """The entries of ``metrics`` named in ``keys`` that are numbers (``None`` skipped)."""
    return {
        k: float(metrics[k])
        for k in keys
        if isinstance(metrics.get(k), Real) and not isinstance(metrics.get(k), bool)
    }


class ClassificationTask:
    """Top-1 classification from logits ``[N, C]`` (the default task).

    Metrics are those of :func:`~netpress.measure.fidelity.classification_fidelity`.
    """

    name = "classification"

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes

    def compare(
        self, ref_outputs: torch.Tensor, cmp_outputs: torch.Tensor, labels: torch.Tensor | None
    ) -> dict[str, Any]:
        return classification_fidelity(ref_outputs, cmp_outputs, labels, self.num_classes)

    def headline(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        keys = ("reference_accuracy", "compressed_accuracy", "agreement", "kl_mean")
        return _pick(metrics, keys)

    def __repr__(self) -> str:
        return f"ClassificationTask(num_classes={self.num_classes})"


class EmbeddingTask:
    """Embeddings / hidden states: cosine similarity of matching rows.

    ``agreement`` is the share of rows whose cosine similarity is at least ``threshold``
    (set it to what your application tolerates); ``cosine`` holds the whole distribution
    (:func:`~netpress.measure.fidelity.cosine_distribution`: quantiles, the share above
    several thresholds and a histogram), which the report shows instead of one share.
    Rows are taken along the last dimension (per token for ``[N, T, D]`` outputs).
    """

    name = "embedding"

    def __init__(self, threshold: float = 0.99) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise RecipeError(f"EmbeddingTask threshold must lie in [-1, 1], got {threshold}")
        self.threshold = threshold

    def compare(
        self, ref_outputs: torch.Tensor, cmp_outputs: torch.Tensor, labels: torch.Tensor | None
    ) -> dict[str, Any]:
        stats = cosine_similarity_stats(ref_outputs, cmp_outputs)
        cos = row_cosines(ref_outputs, cmp_outputs)
        diff = (ref_outputs.double() - cmp_outputs.double()).abs()
        ref_scale = float(ref_outputs.double().abs().mean())
        return {
            "n": stats["n"],
            "cosine_mean": stats["mean"],
            "cosine_min": stats["min"],
            "cosine_p05": stats["p05"],
            "threshold": self.threshold,
            "agreement": float((cos >= self.threshold).double().mean()),
            "max_abs_error": float(diff.max()),
            "mean_abs_error": float(diff.mean()),
            "relative_mean_abs_error": float(diff.mean()) / ref_scale if ref_scale else None,
            "cosine": cosine_distribution(cos, self.threshold),
        }

    def headline(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        return _pick(metrics, ("agreement", "cosine_mean", "cosine_min"))

    def __repr__(self) -> str:
        return f"EmbeddingTask(threshold={self.threshold})"


class FunctionTask:
    """A task defined by a user function ``fn(ref_out, cmp_out, labels) -> dict``.

    The function's dict becomes the metrics; return an ``agreement`` in ``[0, 1]`` to use
    agreement constraints. ``headline`` shows ``headline_keys`` if given, otherwise every
    top-level number.
    """

    def __init__(
        self, fn: TaskFn, name: str = "custom", headline_keys: tuple[str, ...] | None = None
    ) -> None:
        if not callable(fn):
            raise RecipeError(f"FunctionTask needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name
        self.headline_keys = headline_keys

    def compare(
        self, ref_outputs: torch.Tensor, cmp_outputs: torch.Tensor, labels: torch.Tensor | None
    ) -> dict[str, Any]:
        result = self.fn(ref_outputs, cmp_outputs, labels)
        if not isinstance(result, Mapping):
            raise RecipeError(
                f"task function {self.name!r} must return a dict of metrics, got "
                f"{type(result).__name__}"
            )
        return {str(k): v for k, v in result.items()}

    def headline(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        keys = self.headline_keys if self.headline_keys is not None else tuple(metrics)
        return _pick(metrics, keys)

    def __repr__(self) -> str:
        return f"FunctionTask({self.fn!r}, name={self.name!r})"


_BY_NAME: dict[str, Callable[[], Task]] = {
    "classification": ClassificationTask,
    "embedding": EmbeddingTask,
}


#: Task names of :mod:`netpress.measure.text` (imported when asked for).
_TEXT_TASKS = ("language-model", "sentence-embedding", "sentence-embedding:cls")


def as_task(task: Task | TaskFn | str | None) -> Task:
    """A :class:`Task` from a task, a plain function, a task name, or ``None`` (classification).

    Names: ``"classification"``, ``"embedding"`` and ``"embedding:T"`` (threshold ``T``,
    e.g. ``"embedding:0.995"``); for text, ``"language-model"`` (next-token fidelity,
    :class:`~netpress.measure.text.LanguageModelTask`) and ``"sentence-embedding"`` (mean
    pooled over real tokens; ``"sentence-embedding:cls"``: the first token's) for
    :class:`~netpress.measure.text.SentenceEmbeddingTask`. A function is wrapped in
    :class:`FunctionTask`, named after the function (``"custom"`` for a lambda).
    """
    if task is None:
        return ClassificationTask()
    if isinstance(task, str) and task in _TEXT_TASKS:
        from netpress.measure import text

        if task == "language-model":
            return text.LanguageModelTask()
        return text.SentenceEmbeddingTask(pooling="cls" if task.endswith(":cls") else "mean")
    if isinstance(task, str) and task.startswith("embedding:"):
        try:
            return EmbeddingTask(float(task.partition(":")[2]))
        except ValueError:
            raise RecipeError(f"task {task!r}: write embedding:THRESHOLD with a number, "
                              f"e.g. embedding:0.995") from None
    if isinstance(task, str):
        if task not in _BY_NAME:
            raise RecipeError(
                f"unknown task {task!r}; use one of {sorted(_BY_NAME) + list(_TEXT_TASKS)}, "
                f"embedding:THRESHOLD, "
                f"a Task object or a function fn(ref_out, cmp_out, labels) -> dict"
            )
        return _BY_NAME[task]()
    if isinstance(task, Task):
        return task
    if callable(task):
        name = getattr(task, "__name__", "custom")
        return FunctionTask(task, name="custom" if name == "<lambda>" else name)
    raise RecipeError(
        f"task must be a Task, a function fn(ref_out, cmp_out, labels) -> dict, a task name or "
        f"None, got {type(task).__name__}"
    )
