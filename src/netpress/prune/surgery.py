"""Structured-pruning surgery: smaller tensors holding the kept slices, then a check.

:func:`remove_units` replaces every parameter and buffer that holds a removed unit by the
tensor of its kept slices (tied weights stay tied: every owner gets the same new tensor),
brings the size attributes of standard layers in line (``out_channels``, ``groups``,
``in_features``, ``num_features``, ``num_groups``, ...), and sets the attributes the model's
own code builds shapes from (``num_attention_heads``, ``head_dim``, ``split_size``,
``config.hidden_sizes[3]``, ...) to the values :func:`plan_sizes` solved for: the trace
recorded which attributes fed the size arguments of which ``view``/``reshape``/``split``
(:mod:`netpress.graph.sizes`), so no list of attribute names is needed. :func:`undo` puts
everything back. :func:`verify_pruned` then replays the model: the same ops must run with
every tensor shrunk exactly as the graph predicts and the outputs keeping their shapes, else
:class:`PruneCheckError` names the first op that differs and the groups involved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from netpress._inputs import Inputs
from netpress.errors import ModelError
from netpress.graph import ChannelGraph, record
from netpress.graph.sizes import Expr, assign, evaluate, leaves, size_slots, solve_sizes
from netpress.graph.trace import OpRecord, tensors_in

__all__ = ["SurgeryResult", "kept_indices", "remove_units", "verify_pruned", "plan_sizes",
           "undo", "PruneCheckError", "size_attributes", "reshape_template"]


@dataclass
class SurgeryResult:
    """What changed: kept indices per parameter name and dimension, and attributes set
    (``{name: new value}``); ``undo_log`` restores the model (see :func:`undo`)."""

    kept: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    undo_log: list[Callable[[], None]] = field(default_factory=list, repr=False)


class PruneCheckError(ModelError):
    """The pruned model does not run as the graph predicts; ``labels`` are the pruned units
    involved (their groups can be left whole and the pruning tried again) and ``module`` the
    module where it showed (when the units involved cannot be told)."""

    def __init__(self, message: str, labels: np.ndarray, module: str | None = None) -> None:
        super().__init__(message)
        self.labels = labels
        self.module = module


def kept_indices(graph: ChannelGraph, pruned: np.ndarray) -> dict[int, dict[int, torch.Tensor]]:
    """For each parameter/buffer id with removed elements: the kept indices per dimension."""
    out: dict[int, dict[int, torch.Tensor]] = {}
    for key in graph.param_spaces():
        removed = graph.removed(key, pruned)
        if removed.any():
            idx = torch.from_numpy(np.nonzero(~removed)[0])
            out.setdefault(key[0], {})[key[1]] = idx
    return out


def _sync_module(m: nn.Module) -> None:
    """Bring a standard layer's size attributes in line with its (new) tensors."""
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear) and isinstance(w, torch.Tensor):
        m.out_features, m.in_features = int(w.shape[0]), int(w.shape[1])
    elif isinstance(m, nn.modules.conv._ConvNd) and isinstance(w, torch.Tensor):
        old_out = m.out_channels
        new_out = int(w.shape[1]) * m.groups if m.transposed else int(w.shape[0])
        if m.groups > 1 and new_out != old_out:
            m.groups = m.groups * new_out // old_out
        m.out_channels = new_out
        m.in_channels = int(w.shape[0]) if m.transposed else int(w.shape[1]) * m.groups
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        t = w if isinstance(w, torch.Tensor) else getattr(m, "running_mean", None)
        if isinstance(t, torch.Tensor):
            m.num_features = int(t.shape[0])
    elif isinstance(m, nn.GroupNorm) and isinstance(w, torch.Tensor):
        new = int(w.shape[0])
        m.num_groups = max(1, m.num_groups * new // m.num_channels)
        m.num_channels = new
    elif isinstance(m, nn.LayerNorm) and isinstance(w, torch.Tensor):
        m.normalized_shape = tuple(int(s) for s in w.shape)
    elif isinstance(m, nn.RMSNorm) and isinstance(w, torch.Tensor):
        m.normalized_shape = tuple(int(s) for s in w.shape)
    elif isinstance(m, nn.Embedding) and isinstance(w, torch.Tensor):
        m.embedding_dim = int(w.shape[1])
    elif isinstance(m, nn.PReLU) and isinstance(w, torch.Tensor):
        m.num_parameters = int(w.shape[0])
    elif type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(w, torch.Tensor):
        # transformers' GPT-2 style Conv1D: weight is (in, out)
        setattr(m, "nf", int(w.shape[1]))  # noqa: B010


def _new_size(graph: ChannelGraph, t: torch.Tensor, dim: int, pruned: np.ndarray) -> int:
    key = (id(t), dim)
    return graph.kept_size(key, pruned) if key in graph.spaces.base else int(t.shape[dim])


@dataclass
class _Constraint:
    """``expr`` must evaluate to ``want`` after pruning; ``what`` says where it came from and
    ``key`` is the dimension it sizes (None for values and comparisons)."""

    expr: Expr
    want: int
    what: str
    key: tuple[int, int] | None = None


def _constraints(graph: ChannelGraph, pruned: np.ndarray, old: list[int]) -> list[_Constraint]:
    """What the recorded sizes must become: each size argument its dimension's new size;
    attributes the code computed with (``math.sqrt(self.head_dim)``) their value; sizes the
    code compared and found equal (``if x.shape[1] != self.num_channels: raise``) equal."""
    out = []
    for rec in graph.trace.records:
        for use in rec.sizes:
            if use.expr[0] == "const" or use.out >= len(rec.outputs):
                continue
            o = rec.outputs[use.out]
            if use.dim < o.dim():
                out.append(_Constraint(use.expr, _new_size(graph, o, use.dim, pruned),
                                       f"a size in {rec.where()}", (id(o), use.dim)))
    for expr in dict.fromkeys(graph.trace.value_uses):
        if leaves(expr) and not leaves(expr, "dim"):
            out.append(_Constraint(expr, evaluate(expr, lambda leaf: old[leaf[1]]),
                                   "a value the model computes with"))
    for expr in dict.fromkeys(graph.trace.equalities):
        if leaves(expr) or leaves(expr, "dim"):
            out.append(_Constraint(expr, 0, "two sizes the model's code compares"))
    return out


def _involved(graph: ChannelGraph, pruned: np.ndarray, keys: list[tuple[int, int]]) -> np.ndarray:
    """The pruned units among the elements of ``keys``."""
    labs = [graph.labels[graph.spaces.base[k]:graph.spaces.base[k] + graph.spaces.size[k]]
            for k in keys if k in graph.spaces.base]
    if not labs:
        return np.zeros(0, dtype=np.int64)
    lab = np.unique(np.concatenate(labs))
    return lab[pruned[lab]]


def plan_sizes(graph: ChannelGraph, pruned: np.ndarray) -> dict[int, int]:
    """New values (by address index in ``graph.trace.addresses``) for the attributes the
    model's code builds shapes from, so that every recorded size follows the pruning.

    Raises :class:`PruneCheckError` naming where no attribute value fits; its labels are
    the pruned units of every dimension involved.
    """
    old = [a.get() for a in graph.trace.addresses]
    cons = _constraints(graph, pruned, old)
    if not cons:
        return {}
    tensors = graph.trace.tensors

    def dims(leaf: Expr) -> int:
        t = tensors.get(leaf[1])
        if t is None:
            raise KeyError(leaf)
        return _new_size(graph, t, leaf[2], pruned)

    values, failed = solve_sizes([(c.expr, c.want) for c in cons], old, dims)
    if not failed:
        return values
    bad = set(failed)
    broken = [c for c in cons if (c.expr, c.want) in bad]
    attrs = set().union(*(leaves(c.expr) for c in broken))
    related = [c for c in cons if (c.expr, c.want) in bad or leaves(c.expr) & attrs]
    keys = [c.key for c in related if c.key is not None]
    keys += [(leaf[1], leaf[2]) for c in related for leaf in leaves(c.expr, "dim")]
    first = broken[0]
    names = sorted({graph.trace.addresses[a[1]].name for a in leaves(first.expr)})
    source = f"it depends on {', '.join(names)}, and no value fits every use" if names \
        else "it is read from the shape of another tensor, which pruning changes otherwise"
    more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
    raise PruneCheckError(f"structured pruning would break {first.what}{more}: it should "
                          f"stay {first.want}, but {source}" if first.key is None else
                          f"structured pruning would break {first.what}{more}: it should "
                          f"become {first.want}, but {source}", _involved(graph, pruned, keys))


@torch.no_grad()
def remove_units(model: nn.Module, graph: ChannelGraph, pruned: np.ndarray,
                 sizes: dict[int, int] | None = None) -> SurgeryResult:
    """Remove the units marked in ``pruned`` (a mask over component labels) from ``model``
    and set the size attributes ``sizes`` (from :func:`plan_sizes`, computed when None).

    ``graph`` must have been computed on ``model`` itself (its tensors are matched by
    identity). The model is changed in place; :func:`undo` reverts it.
    """
    sizes = plan_sizes(graph, pruned) if sizes is None else sizes
    result = SurgeryResult()
    touched: set[str] = set()
    modules = dict(model.named_modules())
    for pid, dims in kept_indices(graph, pruned).items():
        old = graph.param(pid)
        new = old.detach()
        for d, idx in sorted(dims.items()):
            new = new.index_select(d, idx.to(new.device))
        new = new.contiguous()
        value: torch.Tensor = nn.Parameter(new, requires_grad=old.requires_grad) \
            if isinstance(old, nn.Parameter) else new
        for path, attr in graph.trace.owners[pid]:
            m = modules[path]
            if path not in touched:
                result.undo_log.append(_restorer(m))
            store = m._parameters if attr in m._parameters else m._buffers
            store[attr] = value  # type: ignore[assignment]
            touched.add(path)
        name = graph.trace.param_name(pid)
        result.kept[name] = dims
        result.shapes[name] = (tuple(old.shape), tuple(new.shape))
    for path in touched:
        _sync_module(modules[path])
    addresses = graph.trace.addresses
    result.undo_log.extend(_attribute_restorer(addresses[i]) for i in sizes)
    for name, (_, new_value) in assign(addresses, sizes).items():
        result.attributes[name] = new_value
    return result


def _restorer(m: nn.Module) -> Callable[[], None]:
    params, buffers = dict(m._parameters), dict(m._buffers)
    plain = {k: v for k, v in vars(m).items() if not k.startswith("_")}

    def restore() -> None:
        m._parameters.update(params)
        m._buffers.update(buffers)
        vars(m).update(plain)
    return restore


def _attribute_restorer(address: Any) -> Callable[[], None]:
    old = address.get()
    return lambda: address.set(old)


def undo(result: SurgeryResult) -> None:
    """Put back every tensor and attribute :func:`remove_units` changed."""
    for restore in reversed(result.undo_log):
        restore()
    result.undo_log.clear()


def _expected_shape(graph: ChannelGraph, t: torch.Tensor, pruned: np.ndarray) -> tuple[int, ...]:
    shape = []
    for d in range(t.dim()):
        key = (id(t), d)
        shape.append(graph.kept_size(key, pruned) if key in graph.spaces.base else t.shape[d])
    return tuple(int(s) for s in shape)


def _keys(ts: list[torch.Tensor]) -> list[tuple[int, int]]:
    return [(id(t), d) for t in ts for d in range(t.dim())]


def verify_pruned(model: nn.Module, graph: ChannelGraph, pruned: np.ndarray,
                  example_inputs: Inputs) -> None:
    """Replay ``model`` and check every op's output shape against the graph's prediction.

    Raises :class:`PruneCheckError` (a ModelError) when the forward fails, runs different
    ops, or an op's shape differs (a size in the model's code that surgery could not
    update), or when an output's shape changed; its ``labels`` are the pruned units that the
    failing op touches.
    """
    before = graph.trace.records
    partial: list[OpRecord] = []
    try:
        replay = record(model, example_inputs, records=partial)
    except Exception as exc:
        rec = before[min(len(partial), len(before) - 1)] if before else None
        keys = _keys(list(tensors_in((rec.args, rec.kwargs))) + rec.outputs) if rec else []
        where = f" at {rec.where()}" if rec else ""
        raise PruneCheckError(f"structured pruning broke the model{where}: its forward now "
                              f"fails with {type(exc).__name__}: {exc}",
                              _involved(graph, pruned, keys),
                              rec.module if rec else None) from None
    if len(replay.records) != len(before):
        raise PruneCheckError(f"structured pruning changed the ops the model runs "
                              f"({len(before)} before, {len(replay.records)} after); "
                              f"netpress cannot prune it safely", pruned.nonzero()[0])
    for old, new in zip(before, replay.records):
        want = [_expected_shape(graph, t, pruned) for t in old.outputs]
        got = [tuple(int(s) for s in t.shape) for t in new.outputs]
        if old.name != new.name or want != got:
            keys = _keys(list(tensors_in((old.args, old.kwargs))) + old.outputs)
            raise PruneCheckError(f"structured pruning broke {old.where()}: expected output "
                                  f"shape(s) {want}, got {got} ({new.name}); a size in that "
                                  f"module's code did not follow the pruning",
                                  _involved(graph, pruned, keys), old.module)
    old_shapes = [tuple(t.shape) for t in graph.trace.outputs]
    new_shapes = [tuple(t.shape) for t in replay.outputs]
    if old_shapes != new_shapes:
        raise PruneCheckError(f"structured pruning changed the model's output shapes from "
                              f"{old_shapes} to {new_shapes}",
                              _involved(graph, pruned, _keys(graph.trace.outputs)))


def size_attributes(model: nn.Module) -> dict[str, int]:
    """Every public int attribute (and each item of a list of ints) of the modules and of
    the config-like objects they hold, by name (``encoder.layer.0.attention.num_heads``,
    ``config.hidden_sizes[3]``): what an artefact records so that :func:`reshape_template`
    can restore a pruned architecture whatever attributes its code builds shapes from."""
    out: dict[str, int] = {}
    for _, _, v, name in size_slots(model, plain_only=False):
        if isinstance(v, (list, tuple)):
            out.update({f"{name}[{i}]": int(x) for i, x in enumerate(v)})
        else:
            out[name] = int(v)
    return out


@torch.no_grad()
def reshape_template(model: nn.Module, shapes: dict[str, tuple[int, ...]],
                     attributes: dict[str, int] | None = None) -> list[str]:
    """Give a template (an instance of the unpruned architecture) a pruned model's shapes.

    Every parameter/buffer whose entry in ``shapes`` (state_dict name -> shape) differs is
    replaced by an uninitialised tensor of the recorded shape (tied tensors stay tied),
    standard layers' size attributes follow, and ``attributes`` (from
    :func:`size_attributes`) are set. Load the state_dict afterwards. Returns the names
    whose shape changed.
    """
    modules = dict(model.named_modules())
    replaced: dict[int, torch.Tensor] = {}
    changed: list[str] = []
    touched: set[str] = set()
    for path, m in modules.items():
        for attr in [*m._parameters, *m._buffers]:
            t = m._parameters.get(attr) if attr in m._parameters else m._buffers.get(attr)
            name = f"{path}.{attr}" if path else attr
            want = shapes.get(name)
            if t is None or want is None or tuple(t.shape) == tuple(want):
                continue
            new = replaced.get(id(t))
            if new is None:
                blank = torch.empty(tuple(want), dtype=t.dtype, device=t.device)
                new = nn.Parameter(blank, requires_grad=t.requires_grad) \
                    if isinstance(t, nn.Parameter) else blank
                replaced[id(t)] = new
            if attr in m._parameters:
                m._parameters[attr] = new  # type: ignore[assignment]
            else:
                m._buffers[attr] = new
            changed.append(name)
            touched.add(path)
    for path in touched:
        _sync_module(modules[path])
    slots = {name: (owner, attr) for owner, attr, _, name in size_slots(model, plain_only=False)}
    for key, value in (attributes or {}).items():
        name, index = key, None
        if key.endswith("]") and "[" in key:  # an item of a list: "config.hidden_sizes[3]"
            name, _, rest = key[:-1].rpartition("[")
            index = int(rest) if rest.isdigit() else None
        slot = slots.get(name)
        if slot is None or (index is None and name != key):
            continue
        owner, attr = slot
        current = vars(owner)[attr]
        if index is None and not isinstance(current, (list, tuple)) and current != value:
            vars(owner)[attr] = value
        elif index is not None and isinstance(current, (list, tuple)) and index < len(current) \
                and current[index] != value:
            items = list(current)
            items[index] = value
            vars(owner)[attr] = type(current)(items)
    return changed
