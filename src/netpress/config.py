"""Method configs and recipes, and their (de)serialisation.

A *method* is a small frozen dataclass (its settings) plus a transform registered for that
config type (see :mod:`netpress.registry`). A *recipe* is an ordered list of method configs.
Recipes round-trip through JSON and YAML with a type tag per step and a version, and only
known types and keys are accepted: nothing in a recipe file is imported or executed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Union

from netpress.errors import RecipeError

__all__ = ["MethodConfig", "Recipe", "RECIPE_FORMAT_VERSION", "check_fraction"]

RECIPE_FORMAT_VERSION = 1


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
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise RecipeError(f"recipe is not valid JSON: {exc}") from None

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe is not valid YAML: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the recipe as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        p = Path(path)
        text = self.to_yaml() if p.suffix in (".yaml", ".yml") else self.to_json()
        p.write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a YAML or JSON recipe file."""
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file {str(p)!r} does not exist")
        text = p.read_text(encoding="utf-8")
        try:
            return cls.from_json(text) if p.suffix == ".json" else cls.from_yaml(text)
        except RecipeError as exc:
            raise RecipeError(f"{p}: {exc}") from None

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> typing.Iterator[MethodConfig]:
        return iter(self.steps)
