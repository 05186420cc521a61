"""Where the sizes a model's Python code reshapes with come from, and what they must become.

During the trace (:func:`netpress.graph.record`) every plain ``int`` attribute of every module
(and of the config-like objects modules hold, ``self.config.hidden_sizes[3]`` included) is
replaced by a :class:`SizeInt`: an ``int`` that remembers its origin, and every shape query
(``x.shape``, ``x.size(d)``, ``len(x)``) returns them too. Arithmetic on them keeps an
expression, so ``self.embed_dim // self.num_heads`` or ``x.shape[-1] // self.heads`` is known
by its parts. The size arguments of the ops that build shapes (``view``, ``reshape``,
``split``, ``expand``, ``unflatten``, ``narrow``, the ``new_*``/creation ops) are recorded as
:class:`SizeUse` s: an output dimension and the expression that gave its size.

After pruning, each such dimension has a new size (from the channel graph); :func:`solve_sizes`
finds new values for the attributes so that every expression gives its dimension's new size,
and :func:`assign` sets them. A size written as a literal in the model's code cannot follow:
the rules fix the dimension it sets (see :mod:`netpress.graph.groups`), so pruning never needs
it to change. Two more records constrain the solution: sizes used as *values*
(``math.sqrt(self.head_dim)``, ``scores / self.dim``) keep their value, and two tracked sizes
the code compared and found equal (``if x.shape[1] != self.num_channels: raise``) stay equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from netpress.graph._solver import OPS, Expr, evaluate, leaves, solve_sizes

__all__ = ["SizeInt", "Address", "SizeUse", "SizeTracker", "size_uses", "solve_sizes",
           "assign", "leaves", "evaluate", "size_slots", "wrap_shape", "note_value_uses"]


def _expr(v: Any) -> Expr:
    return v.expr if isinstance(v, SizeInt) else ("const", int(v))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SizeInt(int):
    """An ``int`` with the expression it was computed from (see the module docstring).

    Uses as a *value* rather than a size (``math.sqrt(self.head_dim)``, ``x / self.dim``,
    ``scores * self.heads``) are appended to ``sink``: an attribute used so must keep its
    value, since pruning would change what the model computes, not only its shapes.
    """

    expr: Expr
    sink: list[Expr] | None
    equal: list[Expr] | None

    def __new__(cls, value: int, expr: Expr, sink: list[Expr] | None = None,
                equal: list[Expr] | None = None) -> SizeInt:
        obj = int.__new__(cls, value)
        obj.expr = expr
        obj.sink = sink
        obj.equal = equal
        return obj

    __hash__ = int.__hash__

    def _compare(self, other: Any, want_equal: bool) -> Any:
        result = int.__eq__(int(self), other)
        if result is True and isinstance(other, SizeInt):
            # two tracked sizes the code saw equal (``if x.shape[1] != self.num_channels:
            # raise``) must stay equal; comparisons with plain ints are not recorded
            equal = self.equal if self.equal is not None else other.equal
            if equal is not None:
                equal.append(("-", self.expr, other.expr))
        return result if want_equal or result is NotImplemented else not result

    def __eq__(self, other: object) -> Any:
        return self._compare(other, True)

    def __ne__(self, other: object) -> Any:
        return self._compare(other, False)

    def _bin(self, other: Any, op: str, swap: bool = False) -> Any:
        if not _is_int(other):
            self.used_as_value()
            fn = getattr(int, f"__{'r' if swap else ''}{_NAMES[op]}__")
            return fn(int(self), other)
        a, b = (other, self) if swap else (self, other)
        value = OPS[op](int(a), int(b))
        sink = self.sink if self.sink is not None else getattr(other, "sink", None)
        equal = self.equal if self.equal is not None else getattr(other, "equal", None)
        return SizeInt(value, (op, _expr(a), _expr(b)), sink, equal)

    def used_as_value(self) -> None:
        if self.sink is not None:
            self.sink.append(self.expr)

    def __float__(self) -> float:
        self.used_as_value()
        return float(int(self))

    def __truediv__(self, o: Any) -> Any:
        self.used_as_value()
        return int(self) / o

    def __rtruediv__(self, o: Any) -> Any:
        self.used_as_value()
        return o / int(self)

    def __pow__(self, o: Any, mod: Any = None) -> Any:
        self.used_as_value()
        return pow(int(self), o, mod)

    def __rpow__(self, o: Any, mod: Any = None) -> Any:
        self.used_as_value()
        return pow(o, int(self), mod)

    def __add__(self, o: Any) -> Any:
        return self._bin(o, "+")

    def __radd__(self, o: Any) -> Any:
        return self._bin(o, "+", True)

    def __sub__(self, o: Any) -> Any:
        return self._bin(o, "-")

    def __rsub__(self, o: Any) -> Any:
        return self._bin(o, "-", True)

    def __mul__(self, o: Any) -> Any:
        return self._bin(o, "*")

    def __rmul__(self, o: Any) -> Any:
        return self._bin(o, "*", True)

    def __floordiv__(self, o: Any) -> Any:
        return self._bin(o, "//")

    def __rfloordiv__(self, o: Any) -> Any:
        return self._bin(o, "//", True)

    def __mod__(self, o: Any) -> Any:
        return self._bin(o, "%")

    def __rmod__(self, o: Any) -> Any:
        return self._bin(o, "%", True)

    def __neg__(self) -> Any:
        return SizeInt(-int(self), ("neg", self.expr), self.sink, self.equal)

    def __pos__(self) -> Any:
        return self

    def __copy__(self) -> int:
        return int(self)

    def __deepcopy__(self, memo: Any) -> int:
        return int(self)

    def __reduce__(self) -> Any:
        return (int, (int(self),))


_NAMES = {"+": "add", "-": "sub", "*": "mul", "//": "floordiv", "%": "mod"}


@dataclass(frozen=True)
class Address:
    """An attribute holding a size: ``owner.attr`` (``owner.attr[index]`` for a list)."""

    owner: Any
    attr: str
    index: int | None
    name: str  # for messages and artefacts: "encoder.layer.0.attention.num_heads"

    def get(self) -> int:
        v = vars(self.owner)[self.attr]
        return int(v if self.index is None else v[self.index])

    def set(self, value: int) -> None:
        d = vars(self.owner)
        if self.index is None:
            d[self.attr] = value
        else:
            seq = list(d[self.attr])
            seq[self.index] = value
            d[self.attr] = type(d[self.attr])(seq)


@dataclass
class SizeUse:
    """Output ``out`` (index into the op's outputs), dimension ``dim``, got its size from
    ``expr`` (a literal when ``expr[0] == "const"``)."""

    out: int
    dim: int
    expr: Expr


def _config_like(v: Any) -> bool:
    return (hasattr(v, "__dict__") and not isinstance(v, (nn.Module, torch.Tensor, type))
            and not callable(v) and hasattr(v, "to_dict"))


@dataclass
class SizeTracker:
    """Replaces size attributes by :class:`SizeInt` s for the trace; :meth:`restore` puts the
    original values back."""

    addresses: list[Address] = field(default_factory=list)
    saved: list[tuple[Any, str, Any]] = field(default_factory=list)
    values: list[Expr] = field(default_factory=list)  # expressions used as values
    equal: list[Expr] = field(default_factory=list)  # differences the code saw as zero

    def _wrap(self, owner: Any, attr: str, value: Any, name: str) -> None:
        if _is_int(value) and type(value) is int:
            new: Any = SizeInt(value, ("attr", len(self.addresses)), self.values, self.equal)
            self.addresses.append(Address(owner, attr, None, name))
        elif isinstance(value, (list, tuple)) and value and type(value) in (list, tuple) \
                and all(type(v) is int for v in value):
            items = []
            for i, v in enumerate(value):
                items.append(SizeInt(v, ("attr", len(self.addresses)), self.values, self.equal))
                self.addresses.append(Address(owner, attr, i, f"{name}[{i}]"))
            new = type(value)(items)
        else:
            return
        self.saved.append((owner, attr, value))
        vars(owner)[attr] = new

    def install(self, model: nn.Module) -> None:
        for owner, attr, value, name in size_slots(model):
            self._wrap(owner, attr, value, name)

    def restore(self, model: nn.Module) -> None:
        """Put the original values back, and turn any :class:`SizeInt` the forward stored
        in a module or config (a cached sequence length) into a plain ``int``."""
        for owner, attr, value in reversed(self.saved):
            vars(owner)[attr] = value
        self.saved.clear()
        for owner, attr, value, _ in size_slots(model, plain_only=False):
            if isinstance(value, SizeInt):
                vars(owner)[attr] = int(value)
            elif isinstance(value, (list, tuple)) and any(isinstance(v, SizeInt) for v in value):
                vars(owner)[attr] = type(value)(int(v) if isinstance(v, SizeInt) else v
                                                for v in value)


def size_slots(model: nn.Module, plain_only: bool = True) -> list[tuple[Any, str, Any, str]]:
    """``(owner, attribute, value, name)`` for every public int (or list/tuple of ints)
    attribute of the modules of ``model`` and of the config-like objects they hold (each
    object once, named after the first module path that holds it)."""
    out: list[tuple[Any, str, Any, str]] = []
    seen: set[int] = set()

    def ok(v: Any) -> bool:
        if plain_only:
            return (type(v) is int) or (type(v) in (list, tuple) and bool(v)
                                        and all(type(x) is int for x in v))
        return _is_int(v) or (isinstance(v, (list, tuple)) and bool(v)
                              and all(_is_int(x) for x in v))

    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        for k, v in list(vars(m).items()):
            if k.startswith("_") or isinstance(v, bool):
                continue
            if _config_like(v):
                if id(v) in seen:
                    continue
                seen.add(id(v))
                out.extend((v, ck, cv, f"{prefix}{k}.{ck}") for ck, cv in list(vars(v).items())
                           if not ck.startswith("_") and not isinstance(cv, bool) and ok(cv))
            elif ok(v):
                out.append((m, k, v, f"{prefix}{k}"))
    return out


def wrap_shape(t: torch.Tensor, out: Any, dim: int | None = None,
               equal: list[Expr] | None = None) -> Any:
    """A shape query's result with every size a :class:`SizeInt` of ``("dim", id(t), d)``;
    equalities the code sees between sizes go to ``equal``."""
    if isinstance(out, torch.Size):
        return torch.Size([SizeInt(int(s), ("dim", id(t), d), None, equal)
                           for d, s in enumerate(out)])
    if _is_int(out) and dim is not None:
        d = dim % max(1, t.dim())
        return SizeInt(int(out), ("dim", id(t), d), None, equal)
    return out


def note_value_uses(args: Iterable[Any]) -> None:
    """Sizes passed to a tensor op as operands (``scores / self.head_dim``) are values."""
    for a in args:
        if isinstance(a, SizeInt):
            a.used_as_value()


def _seq(args: Sequence[Any]) -> list[Any]:
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return list(args[0])
    return list(args)


def _dims(sizes: Sequence[Any], first: int = 0, skip_neg: bool = True) -> list[SizeUse]:
    return [SizeUse(0, first + d, _expr(v)) for d, v in enumerate(sizes)
            if _is_int(v) and not (skip_neg and int(v) < 0)]


_CREATE = {"zeros", "ones", "empty", "full", "rand", "randn", "new_zeros", "new_ones",
           "new_empty", "new_full"}


def size_uses(name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
              outputs: list[torch.Tensor]) -> list[SizeUse]:
    """The size arguments of one call, by the output dimension each one sets."""
    try:
        return _size_uses(name, args, kwargs, outputs)
    except (IndexError, TypeError, ValueError):
        return []


def _size_uses(name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
               outputs: list[torch.Tensor]) -> list[SizeUse]:
    if name in ("view", "reshape", "_unsafe_view", "expand", "broadcast_to"):
        if len(args) > 1 and isinstance(args[1], torch.dtype):
            return []
        sizes = _seq(args[1:]) if len(args) > 1 else list(kwargs.get("shape",
                                                                     kwargs.get("size", ())))
        if name in ("expand", "broadcast_to"):
            sizes = [s for s in sizes]
        return _dims(sizes)
    if name == "unflatten":
        dim = int(args[1] if len(args) > 1 else kwargs["dim"])
        sizes = list(args[2] if len(args) > 2 else kwargs["sizes"])
        dim %= max(1, args[0].dim())
        return _dims(sizes, dim)
    if name in ("split", "split_with_sizes") and outputs:
        spec = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections",
                                                         kwargs.get("split_size"))
        dim = int(args[2] if len(args) > 2 else kwargs.get("dim", 0)) % max(1, args[0].dim())
        if isinstance(spec, int) and not isinstance(spec, bool):
            return [SizeUse(i, dim, _expr(spec)) for i, o in enumerate(outputs)
                    if int(o.shape[dim]) == spec]
        if not isinstance(spec, (list, tuple)):
            return []
        return [SizeUse(i, dim, _expr(v)) for i, v in enumerate(spec) if _is_int(v)]
    if name == "narrow":
        dim = int(args[1] if len(args) > 1 else kwargs["dim"]) % max(1, args[0].dim())
        length = args[3] if len(args) > 3 else kwargs["length"]
        return [SizeUse(0, dim, _expr(length))] if _is_int(length) else []
    if name in _CREATE:
        start = 1 if name.startswith("new_") else 0
        rest = [a for a in args[start:] if not isinstance(a, (float, torch.dtype))]
        if name in ("full", "new_full"):
            rest = rest[:1]
        sizes = _seq(rest) if rest else list(kwargs.get("size", ()))
        return _dims(sizes, skip_neg=False)
    return []


def assign(addresses: Sequence[Address], values: dict[int, int]) -> dict[str, tuple[int, int]]:
    """Set the solved values; returns ``{name: (old, new)}``."""
    done = {}
    for i, v in values.items():
        a = addresses[i]
        old = a.get()
        a.set(v)
        done[a.name] = (old, v)
    return done
