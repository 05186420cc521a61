"""Search spaces: recipes with ranges, and per-layer (or grouped) allocation spaces.

A *space* maps a dict of parameter values to a :class:`~netpress.config.Recipe`. Its
parameters are :class:`Range` (a float or int interval, optionally stepped or log-scaled) and
:class:`Choice` (a finite list). Three spaces are provided:

* :class:`RecipeSpace`: a recipe written with ranges in place of values, e.g.
  ``[Step(LayerwiseMagnitudePrune, sparsity=Range(0.3, 0.9)), Step(WeightOnly,
  bits=Choice([4, 8]))]``; ranges may sit in ``per_layer`` mappings too. It loads from a
  JSON/YAML recipe whose values may be ``{"range": [lo, hi]}`` or ``{"choice": [...]}``.
* :class:`LayerwiseSpace`: one sparsity and one weight bit width per layer, or per group of
  layers (``re:`` patterns), emitted as ``LayerwiseMagnitudePrune(per_layer=...)`` and
  ``WeightOnly(per_layer=...)``. The knapsack allocator works on this space.
* :class:`netpress.search.allocation.RuleSpace`: a global ratio plus a sensitivity-derived
  per-layer rule (two knobs for any depth).

Parameter names are stable strings (``"0.sparsity"``, ``"sparsity[layer1]"``) so a journal
written by one run is read by the next.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

import torch
from torch import nn

from netpress.config import MethodConfig, Recipe
from netpress.errors import RecipeError, SelectionError
from netpress.select import matches, select_names, weighted_modules

__all__ = [
    "Range",
    "Choice",
    "Domain",
    "Space",
    "Step",
    "RecipeSpace",
    "LayerwiseSpace",
    "space_fingerprint",
    "load_space",
]


@dataclass(frozen=True)
class Range:
    """A numeric interval ``[low, high]``; ``step`` makes it a grid, ``log`` samples log-uniformly.

    Integer ``low``/``high`` (and step) give an integer parameter.
    """

    low: float
    high: float
    step: float | None = None
    log: bool = False

    def __post_init__(self) -> None:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                 for v in (self.low, self.high))
        if not ok or self.low > self.high:
            raise RecipeError(f"Range({self.low!r}, {self.high!r}): need finite low <= high")
        if self.step is not None and not self.step > 0:
            raise RecipeError(f"Range: step={self.step!r} must be > 0")
        if self.log and (self.low <= 0 or self.step is not None):
            raise RecipeError("Range: log=True needs low > 0 and no step")

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high)) and (
            self.step is None or isinstance(self.step, int))

    def grid(self, points: int = 7) -> list[float]:
        """The values a grid search over this range visits (the step grid, or ``points``)."""
        if self.step is not None:
            n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
            return [_clean(self.low + i * self.step) for i in range(n)]
        if points < 2 or self.low == self.high:
            return [self.low]
        if self.log:
            r = (self.high / self.low) ** (1 / (points - 1))
            return [_clean(self.low * r ** i) for i in range(points)]
        return [_clean(self.low + (self.high - self.low) * i / (points - 1)) for i in range(points)]

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and self.low - 1e-9 <= value <= self.high + 1e-9

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"range": [self.low, self.high]}
        if self.step is not None:
            out["step"] = self.step
        if self.log:
            out["log"] = True
        return out


@dataclass(frozen=True)
class Choice:
    """One of a finite list of JSON values (numbers, strings, booleans or null)."""

    options: tuple[Any, ...]

    def __init__(self, options: Sequence[Any]) -> None:
        opts = tuple(options)
        if not opts:
            raise RecipeError("Choice: give at least one option")
        for o in opts:
            if o is not None and not isinstance(o, (bool, int, float, str)):
                raise RecipeError(f"Choice: option {o!r} is not a number, string, bool or None")
        object.__setattr__(self, "options", opts)

    def contains(self, value: Any) -> bool:
        return value in self.options

    def to_dict(self) -> dict[str, Any]:
        return {"choice": list(self.options)}


Domain = Union[Range, Choice]  # noqa: UP007  (a runtime alias; py3.10 target)


def _clean(x: float) -> float:
    return float(round(x, 10))


class Space(Protocol):
    """What the search needs of a space: named parameters and a way to build a recipe."""

    @property
    def params(self) -> dict[str, Domain]: ...

    def build(self, values: Mapping[str, Any]) -> Recipe: ...

    def describe(self) -> dict[str, Any]: ...


def space_fingerprint(space: Space) -> str:
    """A short hash of ``space.describe()``: a journal only resumes the same space."""
    text = json.dumps(space.describe(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_values(params: Mapping[str, Domain], values: Mapping[str, Any]) -> None:
    missing = sorted(set(params) - set(values))
    if missing:
        raise RecipeError(f"search space: no value for parameter(s) {missing}")
    for name, dom in params.items():
        if not dom.contains(values[name]):
            raise RecipeError(f"search space: {name}={values[name]!r} is outside {dom}")


# --------------------------------------------------------------------------- recipe with ranges


class Step:
    """A method config with :class:`Range`/:class:`Choice` in place of some values.

    ``Step(npr.GlobalMagnitudePrune, sparsity=npr.Range(0.3, 0.9))``; a mapping field
    (``per_layer``) may hold ranges as values.
    """

    def __init__(self, config: type[MethodConfig], **fields: Any) -> None:
        if not (isinstance(config, type) and issubclass(config, MethodConfig)):
            raise RecipeError(f"Step: {config!r} is not a method config class")
        known = set(config.field_names())
        unknown = sorted(set(fields) - known)
        if unknown:
            raise RecipeError(f"Step({config.type_name()}): unknown field(s) {unknown}; known "
                              f"fields are {sorted(known)}")
        self.config = config
        self.fields = dict(fields)

    def domains(self, prefix: str) -> dict[str, Domain]:
        out: dict[str, Domain] = {}
        for key, value in self.fields.items():
            if isinstance(value, (Range, Choice)):
                out[f"{prefix}{key}"] = value
            elif isinstance(value, Mapping):
                for sub, v in value.items():
                    if isinstance(v, (Range, Choice)):
                        out[f"{prefix}{key}[{sub}]"] = v
        return out

    def build(self, prefix: str, values: Mapping[str, Any]) -> MethodConfig:
        kwargs: dict[str, Any] = {}
        for key, value in self.fields.items():
            if isinstance(value, (Range, Choice)):
                kwargs[key] = values[f"{prefix}{key}"]
            elif isinstance(value, Mapping):
                kwargs[key] = {sub: values[f"{prefix}{key}[{sub}]"]
                               if isinstance(v, (Range, Choice)) else v
                               for sub, v in value.items()}
            else:
                kwargs[key] = value
        return self.config(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        def enc(v: Any) -> Any:
            if isinstance(v, (Range, Choice)):
                return v.to_dict()
            if isinstance(v, Mapping):
                return {k: enc(x) for k, x in v.items()}
            return list(v) if isinstance(v, tuple) else v

        return {"type": self.config.type_name(), **{k: enc(v) for k, v in self.fields.items()}}


class RecipeSpace:
    """A recipe with ranges: each :class:`Step` or fixed config, in order."""

    def __init__(self, steps: Sequence[Step | MethodConfig]) -> None:
        if not steps:
            raise RecipeError("RecipeSpace: give at least one step")
        self.steps = list(steps)
        self._params: dict[str, Domain] = {}
        for i, step in enumerate(self.steps):
            if isinstance(step, Step):
                self._params.update(step.domains(f"{i}."))
            elif not isinstance(step, MethodConfig):
                raise RecipeError(f"RecipeSpace: step {i} is {type(step).__name__}, not a "
                                  f"Step or method config")
        if not self._params:
            raise RecipeError("RecipeSpace: no Range or Choice in the recipe: nothing to search")

    @property
    def params(self) -> dict[str, Domain]:
        return dict(self._params)

    def build(self, values: Mapping[str, Any]) -> Recipe:
        _check_values(self._params, values)
        return Recipe(tuple(s.build(f"{i}.", values) if isinstance(s, Step) else s
                            for i, s in enumerate(self.steps)))

    def describe(self) -> dict[str, Any]:
        return {"space": "recipe", "steps": [s.to_dict() for s in self.steps]}


def _decode_domain(value: Any) -> Any:
    if isinstance(value, Mapping) and "range" in value:
        lo, hi = value["range"]
        return Range(lo, hi, value.get("step"), bool(value.get("log", False)))
    if isinstance(value, Mapping) and "choice" in value:
        return Choice(value["choice"])
    if isinstance(value, Mapping):
        return {k: _decode_domain(v) for k, v in value.items()}
    return value


def load_space(path: str | Path) -> RecipeSpace:
    """Read a recipe-with-ranges file (JSON or YAML): a recipe whose values may be
    ``{"range": [lo, hi], "step": s, "log": false}`` or ``{"choice": [...]}``."""
    from netpress.registry import config_from_dict

    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"search space file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    steps_data = data.get("steps") if isinstance(data, Mapping) else data
    if not isinstance(steps_data, list):
        raise RecipeError(f"{p}: a search space is a recipe: a list of steps or {{steps: [...]}}")
    steps: list[Step | MethodConfig] = []
    for i, raw in enumerate(steps_data):
        if not isinstance(raw, Mapping) or "type" not in raw:
            raise RecipeError(f"{p}: step {i} needs a 'type'")
        fields = {k: _decode_domain(v) for k, v in raw.items() if k not in ("type", "version")}
        template = config_from_dict({"type": raw["type"]})  # validates the type name
        if any(isinstance(v, (Range, Choice, dict)) for v in fields.values()):
            steps.append(Step(type(template), **fields))
        else:
            steps.append(config_from_dict(raw))
    return RecipeSpace(steps)


# --------------------------------------------------------------------------- per-layer space


def _layers_of(model: nn.Module, layers: Sequence[str], ignore: Sequence[str]) -> list[str]:
    return select_names(list(weighted_modules(model, (nn.Conv2d, nn.Linear))), layers, ignore,
                        owner="LayerwiseSpace")


def _numel(w: Any) -> int:
    assert isinstance(w, torch.Tensor)
    return int(w.numel())


class LayerwiseSpace:
    """One sparsity and one weight bit width per layer, or per group of layers.

    ``groups`` maps a group name to a list of layer names / ``re:`` patterns; without it each
    selected Conv2d/Linear is its own group (a knob per layer, for small models). Either
    domain may be ``None`` (no pruning, or no quantization). The recipe it builds is
    ``LayerwiseMagnitudePrune(per_layer=...)`` then ``WeightOnly(per_layer=...)``, with
    per-layer entries keyed by exact layer names, so the saved recipe is self-explanatory.
    """

    def __init__(self, model: nn.Module, *, sparsity: Range | Choice | None = None,
                 bits: Range | Choice | None = None,
                 groups: Mapping[str, Sequence[str]] | None = None,
                 layers: Sequence[str] = ("re:.*",), ignore: Sequence[str] = (),
                 weight_observer: str = "mse") -> None:
        if sparsity is None and bits is None:
            raise RecipeError("LayerwiseSpace: give sparsity= and/or bits= to search over")
        names = _layers_of(model, layers, ignore)
        if groups is None:
            self.groups = {n: [n] for n in names}
        else:
            self.groups = {}
            for g, patterns in groups.items():
                members = [n for n in names if any(matches(p, n) for p in patterns)]
                if not members:
                    raise SelectionError(f"LayerwiseSpace: group {g!r} ({list(patterns)}) "
                                         f"matches no selected layer")
                self.groups[g] = members
        self.sparsity, self.bits, self.weight_observer = sparsity, bits, weight_observer
        self.layer_sizes = {n: _numel(model.get_submodule(n).weight) for n in names}

    @property
    def params(self) -> dict[str, Domain]:
        out: dict[str, Domain] = {}
        for g in self.groups:
            if self.sparsity is not None:
                out[f"sparsity[{g}]"] = self.sparsity
            if self.bits is not None:
                out[f"bits[{g}]"] = self.bits
        return out

    def group_values(self, values: Mapping[str, Any], kind: str) -> dict[str, Any]:
        return {g: values[f"{kind}[{g}]"] for g in self.groups}

    def build(self, values: Mapping[str, Any]) -> Recipe:
        from netpress.prune.unstructured import LayerwiseMagnitudePrune
        from netpress.quant.lowbit import WeightOnly

        _check_values(self.params, values)
        steps: list[MethodConfig] = []
        if self.sparsity is not None:
            per = {n: float(values[f"sparsity[{g}]"]) for g, ms in self.groups.items()
                   for n in ms}
            steps.append(LayerwiseMagnitudePrune(sparsity=0.0, layers=tuple(per),
                                                 per_layer=per))
        if self.bits is not None:
            bits = {n: int(values[f"bits[{g}]"]) for g, ms in self.groups.items() for n in ms}
            steps.append(WeightOnly(bits=8, layers=tuple(bits), per_layer=bits,
                                    weight_observer=self.weight_observer))
        return Recipe(tuple(steps))

    def describe(self) -> dict[str, Any]:
        return {"space": "layerwise", "groups": self.groups,
                "sparsity": None if self.sparsity is None else self.sparsity.to_dict(),
                "bits": None if self.bits is None else self.bits.to_dict(),
                "weight_observer": self.weight_observer}
