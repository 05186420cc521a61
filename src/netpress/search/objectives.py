"""What the search minimises (objectives) and the text form of its constraints.

An objective is a small frozen dataclass with ``name``, ``unit`` and
``measure(model, recipe, example_inputs) -> float`` (lower is better):

* :class:`Size`: bytes of the packed ``.npress`` artefact (what ``result.save`` writes);
* :class:`Macs`: multiply-accumulates per input (``sparse=True`` counts only nonzero weights);
* :class:`Params`: nonzero parameters;
* :class:`Latency`: median milliseconds per batch on PyTorch eager or ONNX Runtime, with a
  fixed thread count and batch size.

:func:`parse_constraint` turns ``"agreement>=0.99"``, ``"accuracy_drop<=0.01"`` or
``"class_agreement>=0.9"``, and for text tasks ``"cosine>=0.95"`` (sentence embeddings) or
``"perplexity_ratio<=1.05"`` (language models), into the fidelity constraints of
:mod:`netpress.measure.constraints`.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from netpress._inputs import take_batch
from netpress.config import Recipe
from netpress.errors import RecipeError
from netpress.measure.constraints import (
    Constraint,
    MaxAccuracyDrop,
    MaxClassAgreementDrop,
    MaxPerplexityRatio,
    MinAgreement,
    MinCosine,
)

__all__ = ["Objective", "Size", "Macs", "Params", "Latency", "get_objective", "OBJECTIVES",
           "parse_constraint", "constraint_label"]


class Objective(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def unit(self) -> str: ...

    def measure(self, model: nn.Module, recipe: Recipe, example_inputs: Any) -> float: ...


@dataclass(frozen=True)
class Size:
    """Bytes of the compressed ``.npress`` artefact (packed low-bit codes, sparse bitmaps)."""

    name: str = "size"
    unit: str = "bytes"

    def measure(self, model: nn.Module, recipe: Recipe, example_inputs: Any) -> float:
        from netpress.export import dumps_artefact

        return float(len(dumps_artefact(model, recipe=recipe.to_dict())))


@dataclass(frozen=True)
class Macs:
    """MACs per input (batch of one); ``sparse=True`` skips zero weights."""

    sparse: bool = False
    name: str = "macs"
    unit: str = "MACs"

    def measure(self, model: nn.Module, recipe: Recipe, example_inputs: Any) -> float:
        from netpress.measure.macs import count_macs, count_sparse_macs

        one = take_batch(example_inputs, 1)
        return float(count_sparse_macs(model, one) if self.sparse else count_macs(model, one))


@dataclass(frozen=True)
class Params:
    """Nonzero parameter elements."""

    name: str = "params"
    unit: str = "params"

    def measure(self, model: nn.Module, recipe: Recipe, example_inputs: Any) -> float:
        from netpress.measure.size import nonzero_parameter_count

        return float(nonzero_parameter_count(model))


RUNTIMES = ("eager", "onnx")


@dataclass(frozen=True)
class Latency:
    """Median latency in ms of one batch of ``batch_size`` on ``runtime`` with ``threads``."""

    runtime: str = "eager"
    threads: int = 1
    batch_size: int = 1
    repeats: int = 20
    name: str = "latency"
    unit: str = "ms"

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise RecipeError(f"Latency: runtime={self.runtime!r}; choose one of {RUNTIMES}")
        if self.threads < 1 or self.batch_size < 1 or self.repeats < 1:
            raise RecipeError("Latency: threads, batch_size and repeats must be >= 1")

    def measure(self, model: nn.Module, recipe: Recipe, example_inputs: Any) -> float:
        if self.runtime == "eager":
            from netpress.measure.latency import measure_latency

            stats = measure_latency(model, example_inputs, batch_sizes=(self.batch_size,),
                                    threads=self.threads, repeats=self.repeats)
            return float(stats[self.batch_size].median_ms)
        from netpress.export.onnx import export_onnx, ort_latency

        if not isinstance(example_inputs, torch.Tensor):
            raise RecipeError("Latency(runtime='onnx') needs a single-tensor model input")
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, Path(tmp) / "m.onnx", example_inputs[:1])
            got = ort_latency(path, example_inputs, threads=self.threads,
                              batch_sizes=(self.batch_size,), repeats=self.repeats)
        return float(got[self.batch_size]["median_ms"])


OBJECTIVES = ("size", "macs", "sparse_macs", "params", "latency", "latency_onnx")


def get_objective(spec: str | Objective, *, threads: int = 1, batch_size: int = 1) -> Objective:
    """An objective by name (``OBJECTIVES``) or as given; latency uses ``threads`` and
    ``batch_size``."""
    if not isinstance(spec, str):
        return spec
    table: dict[str, Objective] = {
        "size": Size(), "macs": Macs(), "sparse_macs": Macs(sparse=True, name="sparse_macs"),
        "params": Params(),
        "latency": Latency(threads=threads, batch_size=batch_size),
        "latency_onnx": Latency(runtime="onnx", threads=threads, batch_size=batch_size,
                                name="latency_onnx"),
    }
    if spec not in table:
        raise RecipeError(f"unknown objective {spec!r}; choose one of {OBJECTIVES}")
    return table[spec]


_CONSTRAINT = re.compile(r"^\s*([a-z_]+)\s*(>=|<=)\s*([0-9.eE+-]+)\s*(%?)\s*$")


def parse_constraint(text: str) -> Constraint:
    """``"agreement>=0.99"``, ``"accuracy_drop<=0.01"`` (or ``<=1%``),
    ``"class_agreement>=0.9"`` / ``"class_agreement_drop<=0.1"``, ``"cosine>=0.95"``,
    ``"perplexity_ratio<=1.05"`` -> a constraint object."""
    m = _CONSTRAINT.match(text)
    if not m:
        raise RecipeError(f"constraint {text!r}: write e.g. 'agreement>=0.99', "
                          f"'accuracy_drop<=0.01' or 'class_agreement>=0.9'")
    metric, op, raw, pct = m.groups()
    value = float(raw) / (100.0 if pct else 1.0)
    forms: dict[tuple[str, str], Any] = {
        ("agreement", ">="): lambda v: MinAgreement(v),
        ("accuracy_drop", "<="): lambda v: MaxAccuracyDrop(v),
        ("class_agreement", ">="): lambda v: MaxClassAgreementDrop(round(1.0 - v, 12)),
        ("worst_class_agreement", ">="): lambda v: MaxClassAgreementDrop(round(1.0 - v, 12)),
        ("class_agreement_drop", "<="): lambda v: MaxClassAgreementDrop(v),
        ("cosine", ">="): lambda v: MinCosine(v),
        ("perplexity_ratio", "<="): lambda v: MaxPerplexityRatio(v),
    }
    make = forms.get((metric, op))
    if make is None:
        raise RecipeError(f"constraint {text!r}: known forms are agreement>=X, "
                          f"accuracy_drop<=X, class_agreement>=X, class_agreement_drop<=X, "
                          f"cosine>=X (sentence embeddings), perplexity_ratio<=X (language "
                          f"models)")
    return make(value)  # type: ignore[no-any-return]


def constraint_label(c: Constraint) -> str:
    """``agreement>=0.99`` style text for a constraint object."""
    if isinstance(c, MinAgreement):
        return f"agreement>={c.value:g}"
    if isinstance(c, MaxAccuracyDrop):
        return f"accuracy_drop<={c.value:g}"
    if isinstance(c, MaxClassAgreementDrop):
        return f"class_agreement_drop<={c.value:g}"
    if isinstance(c, MinCosine):
        return f"cosine>={c.value:g}"
    if isinstance(c, MaxPerplexityRatio):
        return f"perplexity_ratio<={c.value:g}"
    return repr(c)
