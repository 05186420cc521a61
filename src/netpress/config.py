"""Method configs and recipes, and their (de)serialisation.

A *method* is a small frozen dataclass (its settings) plus a transform registered for that
config type (see :mod:`netpress.registry`). A *recipe* is an ordered list of method configs.
Recipes round-trip through JSON and YAML with a type tag per step and a version, and only
known types and keys are accepted: nothing in a recipe file is imported or executed.

Loading is strict, and every failure is a :class:`~netpress.errors.RecipeError`: files are
UTF-8 regular files of at most :data:`MAX_RECIPE_BYTES`; YAML aliases may not expand the
document past :data:`MAX_RECIPE_VALUES` values (a "billion laughs" file is refused at load,
before anything walks or prints it); keys are strings, integers fit in 64 bits, nesting is
at most :data:`MAX_RECIPE_DEPTH` deep; ``re:`` layer patterns must compile. An empty recipe is
a valid *value* (the identity: the search measures its baseline with it), but a recipe *file*
with no steps is refused: it is almost always a mistake (an indentation slip in YAML), and
running it would silently compress nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Union

from netpress._atomic import atomic_write
from netpress._repr import short_repr
from netpress.errors import RecipeError

__all__ = ["MethodConfig", "Recipe", "RECIPE_FORMAT_VERSION", "check_fraction",
           "check_recipe_data", "MAX_RECIPE_BYTES", "MAX_RECIPE_VALUES", "MAX_RECIPE_DEPTH"]

RECIPE_FORMAT_VERSION = 1
MAX_RECIPE_BYTES = 4 << 20
"""Largest recipe file read (real recipes take a few kilobytes)."""
MAX_RECIPE_VALUES = 100_000
"""Most values a recipe may hold once YAML aliases are expanded."""
MAX_RECIPE_DEPTH = 32
"""Deepest nesting of lists and mappings in a recipe."""
_MAX_INT = 2**63 - 1


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Base class of every method config.

    Subclasses are frozen dataclasses; they validate their fields in ``__post_init__`` and
    raise :class:`~netpress.errors.RecipeError` naming the field. ``version`` is bumped when a
    config's meaning changes; older versions are migrated in :meth:`migrate`.
    """

    version: ClassVar[int] = 1

    @classmethod
    def type_name(cls) -> str:
        """The type tag written in recipes (the class name)."""
        return cls.__name__

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"type": ..., "version": ..., <fields>}``."""
        out: dict[str, Any] = {"type": self.type_name(), "version": self.version}
        for name in self.field_names():
            out[name] = _to_jsonable(getattr(self, name))
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        """Field names, the config's own first, then those it inherits."""
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        names: list[str] = []
        for klass in cls.__mro__:
            for name in vars(klass).get("__annotations__", {}):
                if name in fields and name not in names:
                    names.append(name)
        return names

    @classmethod
    def migrate(cls, data: dict[str, Any], from_version: int) -> dict[str, Any]:
        """Turn the fields of an older version into the current one (identity by default)."""
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodConfig:
        """Build a config of *this* class from its dict, rejecting unknown keys."""
        check_recipe_data(data, cls.type_name())
        body = dict(data)
        body.pop("type", None)
        version = body.pop("version", cls.version)
        if not isinstance(version, int) or version < 1 or version > cls.version:
            raise RecipeError(
                f"{cls.type_name()}: version {version!r} is not supported by this netpress "
                f"(it reads versions 1..{cls.version}); upgrade netpress or fix the recipe"
            )
        if version < cls.version:
            body = cls.migrate(body, version)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(body) - names)
        if unknown:
            raise RecipeError(
                f"{cls.type_name()}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known keys are: {', '.join(sorted(names))}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(v, hints.get(k)) for k, v in body.items()}
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise RecipeError(f"{cls.type_name()}: {exc}") from None


def check_fraction(owner: str, name: str, value: Any, *, hi_open: bool = True) -> None:
    """Raise RecipeError unless ``0 <= value < 1`` (or ``<= 1`` when ``hi_open`` is False)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = 0.0 <= value < 1.0 if hi_open else 0.0 <= value <= 1.0
    if not ok:
        rng = "[0, 1)" if hi_open else "[0, 1]"
        raise RecipeError(f"{owner}: {name}={value!r} is outside {rng}")


def check_recipe_data(data: Any, where: str = "recipe") -> None:
    """RecipeError unless ``data`` is a plain tree a recipe may hold: string keys, integers
    within 64 bits, at most :data:`MAX_RECIPE_DEPTH` deep and :data:`MAX_RECIPE_VALUES` values
    once shared (aliased) parts are counted every time they appear; no cycles."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(value: Any, path: str, depth: int) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, dict, list, tuple)):
            return 1
        if isinstance(value, int):
            if abs(value) > _MAX_INT:
                raise RecipeError(f"{where}: {path or 'value'} = {short_repr(value, 40)} does not "
                                  "fit in 64 bits")
            return 1
        if id(value) in sizes:
            return sizes[id(value)]
        if id(value) in active:
            raise RecipeError(f"{where}: {path or 'the recipe'} contains itself (a recursive "
                              "YAML alias)")
        if depth > MAX_RECIPE_DEPTH:
            raise RecipeError(f"{where}: {path} nests deeper than {MAX_RECIPE_DEPTH} levels")
        active.add(id(value))
        total = 1
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise RecipeError(f"{where}: key {short_repr(k, 40)} under {path or 'the top'}"
                                      f" is a {type(k).__name__}; recipe keys are strings")
                total += size(v, f"{path}.{k}" if path else k, depth + 1)
                if total > MAX_RECIPE_VALUES:
                    break
        else:
            for i, v in enumerate(value):
                total += size(v, f"{path}[{i}]", depth + 1)
                if total > MAX_RECIPE_VALUES:
                    break
        active.discard(id(value))
        if total > MAX_RECIPE_VALUES:
            raise RecipeError(f"{where}: {path or 'the recipe'} expands to more than "
                              f"{MAX_RECIPE_VALUES} values (YAML aliases?); recipes are small")
        sizes[id(value)] = total
        return total

    size(data, "", 1)


def _check_patterns(step: MethodConfig, index: int) -> None:
    """Every ``re:`` layer pattern in ``step`` (values and mapping keys) must compile."""
    stack: list[tuple[str, Any]] = list(step.to_dict().items())
    while stack:
        where, value = stack.pop()
        if isinstance(value, str) and value.startswith("re:"):
            try:
                re.compile(value[3:])
            except re.error as exc:
                raise RecipeError(f"recipe step {index} ({step.type_name()}): {where}: layer "
                                  f"pattern {short_repr(value, 60)} is not a valid regex: "
                                  f"{exc}") from None
        elif isinstance(value, Mapping):
            stack.extend((where, k) for k in value)
            stack.extend((f"{where}[{k!r}]", v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((where, v) for v in value)


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, MethodConfig):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    return value


def _coerce(value: Any, hint: Any) -> Any:
    """Turn JSON lists back into tuples where the field is a tuple; nested configs too."""
    if hint is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            coerced = _coerce(value, arg)
            if coerced is not value:
                return coerced
        return value
    if isinstance(value, list) and (origin is tuple or hint is tuple):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if args and len(args) == len(value):
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        return tuple(value)
    if isinstance(value, Mapping) and "type" in value and isinstance(hint, type) \
            and issubclass(hint, MethodConfig):
        from netpress.registry import config_from_dict

        return config_from_dict(value)
    return value


@dataclass(frozen=True)
class Recipe:
    """An ordered list of method configs, applied one after the other."""

    steps: tuple[MethodConfig, ...]

    def __post_init__(self) -> None:
        bad = [s for s in self.steps if not isinstance(s, MethodConfig)]
        if bad:
            raise RecipeError(
                f"a recipe holds method configs (e.g. npr.GlobalMagnitudePrune(...)), "
                f"got {type(bad[0]).__name__}"
            )
        for i, step in enumerate(self.steps):
            _check_patterns(step, i)

    @classmethod
    def of(cls, recipe: Recipe | MethodConfig | Iterable[MethodConfig] | str | Path) -> Recipe:
        """Accept a Recipe, one config, a list of configs, or a path to a YAML/JSON recipe."""
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, MethodConfig):
            return cls((recipe,))
        if isinstance(recipe, (str, Path)):
            return cls.load(recipe)
        return cls(tuple(recipe))

    def to_dict(self) -> dict[str, Any]:
        """``{"netpress_recipe": 1, "steps": [...]}``."""
        steps = [s.to_dict() for s in self.steps]
        return {"netpress_recipe": RECIPE_FORMAT_VERSION, "steps": steps}

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """Parse a recipe dict (or a bare list of steps), rejecting unknown types and keys."""
        from netpress.registry import config_from_dict

        check_recipe_data(data)
        if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
            data = {"netpress_recipe": RECIPE_FORMAT_VERSION, "steps": list(data)}
        if not isinstance(data, Mapping):
            raise RecipeError("a recipe is a mapping with 'netpress_recipe' and 'steps'")
        unknown = sorted(set(data) - {"netpress_recipe", "steps"})
        if unknown:
            raise RecipeError(f"recipe: unknown top-level key(s) {unknown}; expected "
                              "'netpress_recipe' and 'steps'")
        fmt = data.get("netpress_recipe", RECIPE_FORMAT_VERSION)
        if fmt != RECIPE_FORMAT_VERSION:
            raise RecipeError(f"recipe format version {fmt!r} is not supported "
                              f"(this netpress reads {RECIPE_FORMAT_VERSION})")
        steps = data.get("steps")
        if not isinstance(steps, Sequence) or isinstance(steps, (str, bytes)):
            raise RecipeError("recipe: 'steps' must be a list of method configs")
        out = []
        for i, step in enumerate(steps):
            try:
                out.append(config_from_dict(step))
            except RecipeError as exc:
                raise RecipeError(f"recipe step {i}: {exc}") from None
        return cls(tuple(out))

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            data = json.loads(text)
        except RecursionError:
            raise RecipeError("recipe JSON nests too deeply") from None
        except ValueError as exc:  # JSONDecodeError, or an integer of thousands of digits
            raise RecipeError(f"recipe is not valid JSON: {str(exc)[:200]}") from None
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        """Parse YAML with ``yaml.safe_load``; aliases are bounded by :func:`check_recipe_data`
        (PyYAML shares aliased nodes, so loading a "billion laughs" file is cheap: the blow-up
        comes when something walks or prints it, and the check refuses it before that)."""
        import yaml

        try:
            data = yaml.safe_load(text)
        except RecursionError:
            raise RecipeError("recipe YAML nests too deeply") from None
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: an int of 5,000 digits
            raise RecipeError(f"recipe is not valid YAML: {str(exc)[:300]}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the recipe atomically as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        p = Path(path)
        atomic_write(p, self.to_yaml() if p.suffix in (".yaml", ".yml") else self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a YAML or JSON recipe file (UTF-8, a regular file, at least one step)."""
        p = Path(path)
        if not p.exists():
            raise RecipeError(f"recipe file {str(p)!r} does not exist")
        if not p.is_file():
            raise RecipeError(f"recipe file {str(p)!r} is not a regular file")
        if p.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe file {str(p)!r} takes {p.stat().st_size} bytes; recipes "
                              f"are small (at most {MAX_RECIPE_BYTES} bytes are read)")
        try:
            text = p.read_bytes()[:MAX_RECIPE_BYTES].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError(f"recipe file {str(p)!r} is not UTF-8 text ({exc})") from None
        try:
            recipe = cls.from_json(text) if p.suffix == ".json" else cls.from_yaml(text)
        except RecipeError as exc:
            raise RecipeError(f"{p}: {exc}") from None
        if not recipe.steps:
            raise RecipeError(f"{p}: the recipe has no steps. An empty recipe file is almost "
                              "always a mistake (check the indentation under 'steps:'); to "
                              "only measure a model, pass Recipe(()) in code")
        return recipe

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> typing.Iterator[MethodConfig]:
        return iter(self.steps)
