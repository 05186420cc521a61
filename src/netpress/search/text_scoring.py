"""Scoring search trials with a text task, batch by batch, with sound early stops.

Text batches (dicts of ``input_ids`` / ``attention_mask`` of different lengths) cannot be
concatenated, and their fidelity is not a classifier's top-1 agreement. A
:class:`TextScorer` runs the reference once (:meth:`TextScorer.prepare`) and keeps what each
trial compares against: a sentence encoder's pooled embeddings, a language model's logits
(while they fit in ``cache_bytes``; beyond that the reference is run again per batch, so
full-vocabulary logits are never held for a large data set). :meth:`TextScorer.score` then
runs the compressed model batch by batch and, after each batch, checks the constraints on an
**optimistic** report, an upper bound of every metric the constraints read:

* language models: next-token agreement counting every token not yet seen as agreeing
  (the number of scored tokens is known from the masks); the perplexity ratio with a zero
  negative log-likelihood on the unseen tokens (the reference's is known);
* sentence encoders: the mean cosine with every unseen sentence at cosine 1, the minimum
  cosine over the sentences seen; retrieval agreement has no such bound (a neighbour can
  change either way) and counts as 1.

A trial whose bound violates a constraint is certainly infeasible on this data and stops;
no feasible trial is ever stopped. Its constraints are then reported on the sentences seen.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from netpress._inputs import move_to, primary_output
from netpress.errors import DataError, RecipeError
from netpress.measure.collect import evaluating, model_device, run_checked
from netpress.measure.constraints import Constraint, check_all
from netpress.measure.fidelity import row_cosines
from netpress.measure.text import (
    LanguageModelTask,
    SentenceEmbeddingTask,
    _tokens_of,
    lm_metrics,
    next_token_sums,
)

__all__ = ["TextScore", "TextScorer", "is_text_task", "task_report", "check_constraints_fit"]

#: Metric names each built-in task reports (checked against the constraints before a search).
_LM_KEYS = ("tokens", "perplexity_reference", "perplexity_compressed", "perplexity_ratio",
            "agreement", "kl_mean", "top5_overlap")
_SE_KEYS = ("n", "cosine_mean", "cosine_min", "cosine_p05", "retrieval_agreement", "agreement")
_CLS_KEYS = ("agreement", "reference_accuracy", "compressed_accuracy",
             "worst_class_agreement")


def is_text_task(task: Any) -> bool:
    """Whether ``task`` is scored batch by batch here (the built-in text tasks, or any task
    with ``compare_models``)."""
    return isinstance(task, (LanguageModelTask, SentenceEmbeddingTask)) or callable(
        getattr(task, "compare_models", None))


def task_report(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The report the constraints read from a text task's metrics: ``agreement`` at the top,
    every metric under ``fidelity`` (as ``report.json`` of ``compress``)."""
    return {"agreement": metrics.get("agreement"), "fidelity": dict(metrics)}


def check_constraints_fit(constraints: Sequence[Constraint], task: Any) -> None:
    """Raise a :class:`RecipeError` before any trial runs when a constraint reads a metric
    that ``task`` does not give (e.g. ``cosine>=X`` on a language model)."""
    from netpress.search.evaluate import report_from_metrics

    if isinstance(task, LanguageModelTask):
        probe = task_report(dict.fromkeys(_LM_KEYS, 1.0))
    elif isinstance(task, SentenceEmbeddingTask):
        probe = task_report(dict.fromkeys(_SE_KEYS, 1.0))
    elif task is None or getattr(task, "name", None) == "classification":
        probe = report_from_metrics(dict.fromkeys(_CLS_KEYS, 1.0))
    else:
        return  # a custom task: its metrics are known only once measured
    name = "classification" if task is None else task.name
    for c in constraints:
        try:
            c.check(probe)
        except DataError as exc:
            raise RecipeError(f"search with the {name} task: {exc}") from None


@dataclass
class TextScore:
    """One trial's measurement: the metrics (on the inputs seen), how many sequences were
    seen, whether it stopped early, and the optimistic report it stopped on."""

    metrics: dict[str, Any]
    n_evaluated: int
    early_stopped: bool = False
    optimistic: dict[str, Any] | None = None


def _valid_positions(inputs: Any, labels: Any) -> int:
    """How many next-token positions of a language-model batch are scored (the count of
    :func:`~netpress.measure.text.next_token_sums`), from the inputs alone."""
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise DataError("a language-model batch needs input_ids [batch, time]")
    if isinstance(labels, torch.Tensor) and labels.shape == ids.shape:
        ids = labels  # token labels of the logits' shape are the targets (as _tokens)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    valid = real[:, :-1] & real[:, 1:] & (ids[:, 1:] >= 0)
    return int(valid.sum())


def _mask(inputs: Any) -> torch.Tensor | None:
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return None if mask is None else mask.bool()


class TextScorer:
    """Scores compressed copies of ``reference`` on ``batches`` (``(inputs, labels)`` pairs)
    with ``task`` (see the module docs)."""

    def __init__(self, task: Any, batches: Sequence[tuple[Any, Any]], *,
                 cache_bytes: int = 256 * 2**20) -> None:
        if not batches:
            raise DataError("search: the evaluation data is empty")
        self.task, self.batches, self.cache_bytes = task, list(batches), cache_bytes
        self._ref: list[torch.Tensor | None] | None = None
        self._nll_reference = 0.0
        self._positions: list[int] = []

    @property
    def sequences(self) -> int:
        return sum(int(_rows(x)) for x, _ in self.batches)

    def _forward(self, model: nn.Module, index: int) -> tuple[Any, Any]:
        inputs = move_to(self.batches[index][0], model_device(model))
        return run_checked(model, inputs, f"evaluation batch {index}"), inputs

    def _reference_batch(self, reference: nn.Module, index: int) -> torch.Tensor:
        out, inputs = self._forward(reference, index)
        if isinstance(self.task, SentenceEmbeddingTask):
            return self.task.embed(out, inputs).cpu()
        return primary_output(out).float().cpu()

    def prepare(self, reference: nn.Module) -> None:
        """Run the reference once: cache what the trials compare against."""
        if self._ref is not None or not isinstance(self.task, (LanguageModelTask,
                                                               SentenceEmbeddingTask)):
            return
        cached: list[torch.Tensor | None] = []
        used = 0
        with _inference(reference):
            for i, (inputs, labels) in enumerate(self.batches):
                ref = self._reference_batch(reference, i)
                if isinstance(self.task, LanguageModelTask):
                    part = next_token_sums(ref, ref, _tokens_of(inputs, labels, ref), _mask(inputs))
                    self._nll_reference += part["nll_reference"]
                    self._positions.append(_valid_positions(inputs, labels))
                    used += ref.numel() * ref.element_size()
                    cached.append(ref if used <= self.cache_bytes else None)
                else:
                    cached.append(ref)
        self._ref = cached

    def _reference(self, reference: nn.Module, index: int) -> torch.Tensor:
        assert self._ref is not None
        got = self._ref[index]
        return got if got is not None else self._reference_batch(reference, index)

    def score(self, reference: nn.Module, compressed: nn.Module,
              constraints: Sequence[Constraint], *, early_stop: bool) -> TextScore:
        """Measure ``compressed`` against ``reference`` batch by batch (see module docs)."""
        if isinstance(self.task, LanguageModelTask):
            self.prepare(reference)
            return self._score_lm(reference, compressed, constraints, early_stop)
        if isinstance(self.task, SentenceEmbeddingTask):
            self.prepare(reference)
            return self._score_embeddings(reference, compressed, constraints, early_stop)
        metrics, n, _ = self.task.compare_models(reference, compressed,
                                                 [tuple(b) for b in self.batches])
        return TextScore(dict(metrics), int(n))

    def _score_lm(self, reference: nn.Module, compressed: nn.Module,
                  constraints: Sequence[Constraint], early_stop: bool) -> TextScore:
        total = float(sum(self._positions))
        if total <= 0:
            raise DataError("no token was scored: every evaluation text is shorter than two "
                            "real tokens")
        sums = dict.fromkeys(("tokens", "nll_reference", "nll_compressed", "agree", "kl",
                              "top5"), 0.0)
        n = 0
        with _inference(reference), _inference(compressed):
            for i, (inputs, labels) in enumerate(self.batches):
                ref = self._reference(reference, i)
                out, moved = self._forward(compressed, i)
                cmp = primary_output(out).float().cpu()
                part = next_token_sums(ref, cmp, _tokens_of(inputs, labels, ref), _mask(inputs))
                for k in sums:
                    sums[k] += part[k]
                n += int(ref.shape[0])
                if early_stop and i + 1 < len(self.batches) and sums["tokens"] > 0:
                    unseen = total - sums["tokens"]
                    bound = {"agreement": (sums["agree"] + unseen) / total,
                             "perplexity_ratio": math.exp(
                                 (sums["nll_compressed"] - self._nll_reference) / total)}
                    report = task_report(bound)
                    if not all(r.satisfied for r in check_all(list(constraints), report)):
                        return TextScore(lm_metrics(sums), n, True, report)
        return TextScore(lm_metrics(sums), n)

    def _score_embeddings(self, reference: nn.Module, compressed: nn.Module,
                          constraints: Sequence[Constraint], early_stop: bool) -> TextScore:
        assert self._ref is not None and isinstance(self.task, SentenceEmbeddingTask)
        refs = [r for r in self._ref if r is not None]
        total = sum(int(r.shape[0]) for r in refs)
        cmps: list[torch.Tensor] = []
        with _inference(compressed):
            for i in range(len(self.batches)):
                out, inputs = self._forward(compressed, i)
                cmps.append(self.task.embed(out, inputs).cpu())
                seen = sum(int(c.shape[0]) for c in cmps)
                if early_stop and i + 1 < len(self.batches) and seen >= 2:
                    r, c = torch.cat(refs[:i + 1]), torch.cat(cmps)
                    cos = row_cosines(r, c)
                    bound = {"cosine_mean": (float(cos.sum()) + total - seen) / total,
                             "cosine_min": float(cos.min()), "agreement": 1.0}
                    report = task_report(bound)
                    if not all(x.satisfied for x in check_all(list(constraints), report)):
                        return TextScore(self.task.compare(r, c, None), seen, True, report)
        return TextScore(self.task.compare(torch.cat(refs), torch.cat(cmps), None), total)


def _rows(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, Mapping):
        for v in inputs.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
    return 1


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    with evaluating(model), torch.inference_mode():
        yield
