"""The explicit registry of compression methods.

A method is registered with :func:`register`, which ties a config class to the function that
applies it. Nothing is discovered by walking packages; ``list_methods()`` lists what is here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from netpress._repr import short_repr
from netpress.errors import RecipeError

if TYPE_CHECKING:
    from torch import nn

    from netpress.config import MethodConfig
    from netpress.context import Context

__all__ = ["MethodInfo", "register", "get_method", "list_methods", "config_from_dict"]

Transform = Callable[["nn.Module", Any, "Context"], "nn.Module"]
Needs = tuple[str, ...] | Callable[[Any], tuple[str, ...]]
F = TypeVar("F", bound=Callable[..., Any])

KINDS = ("prune", "quantize", "recover", "other")


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows about one method."""

    name: str
    kind: str
    config: type[MethodConfig]
    apply: Transform
    needs: tuple[str, ...]
    summary: str
    needs_fn: Callable[[Any], tuple[str, ...]] | None = None
    copy_on_write: bool = False

    @property
    def is_recovery(self) -> bool:
        return self.kind == "recover"

    def needs_of(self, config: MethodConfig) -> tuple[str, ...]:
        """The data arguments ``config`` requires (``needs`` unless it depends on settings)."""
        return tuple(self.needs_fn(config)) if self.needs_fn is not None else self.needs


_METHODS: dict[str, MethodInfo] = {}


def register(config: type[MethodConfig], *, kind: str, needs: Needs = (),
             copy_on_write: bool = False) -> Callable[[F], F]:
    """Register ``fn(model, config, ctx) -> model`` as the transform for ``config``.

    ``kind`` is one of ``prune``, ``quantize``, ``recover``, ``other``; ``needs`` names the
    data arguments the method requires (``"train"``, ``"calibration"``, ``"example_inputs"``),
    or is a function ``config -> names`` when that depends on the settings (weight-only
    ``Quantize(activations=None)`` needs no calibration data). ``MethodInfo.needs`` then
    lists what the default config needs.

    ``copy_on_write=True`` declares that the transform never writes into a tensor of the model
    it is given that it did not create: it replaces tensors (``netpress._cow.assign_``, new
    modules or Parameters) or gives one its own storage first (``netpress._cow.own_``).
    ``compress()`` then lets it work on a copy that shares the caller's tensors (one model
    copy less at the peak); other methods get a working copy of their own first.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def deco(fn: F) -> F:
        name = config.type_name()
        if name in _METHODS and _METHODS[name].config is not config:
            raise ValueError(f"a method named {name!r} is already registered")
        doc = (config.__doc__ or "").strip().splitlines()
        if callable(needs):
            needs_fn: Callable[[Any], tuple[str, ...]] | None = needs
            listed = _default_needs(config, needs)
        else:
            needs_fn, listed = None, tuple(needs)
        _METHODS[name] = MethodInfo(name, kind, config, fn, listed, doc[0] if doc else "",
                                    needs_fn, copy_on_write)
        return fn

    return deco


def _default_needs(config: type[MethodConfig],
                   needs_fn: Callable[[Any], tuple[str, ...]]) -> tuple[str, ...]:
    try:
        default = config()
    except (TypeError, RecipeError):  # a config without defaults lists nothing up front
        return ()
    return tuple(needs_fn(default))


def _ensure_builtin() -> None:
    import netpress.methods  # noqa: F401  (registers the built-in methods)


def get_method(config: MethodConfig | type[MethodConfig] | str) -> MethodInfo:
    """The registered method for a config instance, config class, or type name."""
    _ensure_builtin()
    name = config if isinstance(config, str) else config.type_name()
    info = _METHODS.get(name)
    if info is None:
        raise RecipeError(
            f"unknown method {name!r}; known methods are: {', '.join(sorted(_METHODS))}"
        )
    return info


def list_methods() -> list[MethodInfo]:
    """Every registered method, sorted by kind then name."""
    _ensure_builtin()
    return sorted(_METHODS.values(), key=lambda m: (KINDS.index(m.kind), m.name))


def config_from_dict(data: Mapping[str, Any]) -> MethodConfig:
    """Build a config from ``{"type": ..., ...}``; only registered types are accepted."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"a recipe step must be a mapping with a 'type', got "
                          f"{short_repr(data)}")
    name = data.get("type")
    if not isinstance(name, str):
        raise RecipeError(f"a recipe step needs a 'type' naming the method: "
                          f"{short_repr(dict(data))}")
    return get_method(name).config.from_dict(data)
