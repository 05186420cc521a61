"""Structured-pruning surgery: smaller tensors holding the kept slices, then a check.

:func:`remove_units` replaces every parameter and buffer that holds a removed unit by the
tensor of its kept slices (tied weights stay tied: every owner gets the same new tensor),
brings the size attributes of standard layers in line (``out_channels``, ``groups``,
``in_features``, ``num_features``, ``num_groups``, ...), and updates the head-count and
split-size attributes of the modules whose code used those sizes (``num_attention_heads``,
``all_head_size``, ``split_size``, ...). :func:`verify_pruned` then replays the model: the
same ops must run with every tensor shrunk exactly as the graph predicts and the outputs
keeping their shapes, else :class:`~netpress.errors.ModelError` names the first op that
differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from netpress._inputs import Inputs
from netpress.errors import ModelError
from netpress.graph import ChannelGraph, record

__all__ = ["SurgeryResult", "kept_indices", "remove_units", "verify_pruned", "SIZE_ATTRS"]

#: Module attributes holding a size that a module's own code reshapes or splits with. They
#: are updated where the graph saw the module use that size and the size changed.
SIZE_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_key_value_heads",
              "num_kv_heads", "all_head_size", "split_size", "inner_dim", "num_groups")


@dataclass
class SurgeryResult:
    """What changed: kept indices per parameter name and dimension, and attributes set."""

    kept: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)


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
        m.num_groups = m.num_groups * new // m.num_channels
        m.num_channels = new
    elif isinstance(m, nn.LayerNorm) and isinstance(w, torch.Tensor):
        m.normalized_shape = tuple(int(s) for s in w.shape)
    elif isinstance(m, nn.Embedding) and isinstance(w, torch.Tensor):
        m.embedding_dim = int(w.shape[1])
    elif isinstance(m, nn.PReLU) and isinstance(w, torch.Tensor):
        m.num_parameters = int(w.shape[0])
    elif type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(w, torch.Tensor):
        # transformers' GPT-2 style Conv1D: weight is (in, out)
        setattr(m, "nf", int(w.shape[1]))  # noqa: B010


@torch.no_grad()
def remove_units(model: nn.Module, graph: ChannelGraph, pruned: np.ndarray) -> SurgeryResult:
    """Remove the units marked in ``pruned`` (a mask over component labels) from ``model``.

    ``graph`` must have been computed on ``model`` itself (its tensors are matched by
    identity). The model is changed in place.
    """
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
            if attr in m._parameters:
                m._parameters[attr] = value  # type: ignore[assignment]
            else:
                m._buffers[attr] = value
            touched.add(path)
        name = graph.trace.param_name(pid)
        result.kept[name] = dims
        result.shapes[name] = (tuple(old.shape), tuple(new.shape))
    for path in touched:
        _sync_module(modules[path])
    _update_sizes(modules, graph, pruned, result)
    return result


def _update_sizes(modules: dict[str, nn.Module], graph: ChannelGraph, pruned: np.ndarray,
                  result: SurgeryResult) -> None:
    changes: dict[str, dict[int, set[int]]] = {}
    for path, keys in graph.spaces.consts:
        for key in keys:
            old = graph.spaces.size[key]
            new = graph.kept_size(key, pruned)
            if new != old:
                changes.setdefault(path, {}).setdefault(old, set()).add(new)
    for path, table in changes.items():
        m = modules.get(path)
        if m is None:
            continue
        for attr in SIZE_ATTRS:
            value = getattr(m, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and \
                    len(table.get(value, ())) == 1:
                (new,) = table[value]
                if attr == "num_groups" and isinstance(m, nn.GroupNorm):
                    continue  # already synced from its tensors
                setattr(m, attr, new)
                result.attributes[f"{path}.{attr}" if path else attr] = new


def _expected_shape(graph: ChannelGraph, t: torch.Tensor, pruned: np.ndarray) -> tuple[int, ...]:
    shape = []
    for d in range(t.dim()):
        key = (id(t), d)
        shape.append(graph.kept_size(key, pruned) if key in graph.spaces.base else t.shape[d])
    return tuple(int(s) for s in shape)


def verify_pruned(model: nn.Module, graph: ChannelGraph, pruned: np.ndarray,
                  example_inputs: Inputs) -> None:
    """Replay ``model`` and check every op's output shape against the graph's prediction.

    Raises ModelError when the forward fails, runs different ops, or an op's shape differs
    (a size constant in the model's code that surgery could not update), or when an
    output's shape changed.
    """
    try:
        replay = record(model, example_inputs)
    except Exception as exc:
        raise ModelError(f"structured pruning broke the model: its forward now fails with "
                         f"{type(exc).__name__}: {exc}") from None
    before = graph.trace.records
    if len(replay.records) != len(before):
        raise ModelError(f"structured pruning changed the ops the model runs ({len(before)} "
                         f"before, {len(replay.records)} after); netpress cannot prune it safely")
    for old, new in zip(before, replay.records):
        want = [_expected_shape(graph, t, pruned) for t in old.outputs]
        got = [tuple(int(s) for s in t.shape) for t in new.outputs]
        if old.name != new.name or want != got:
            raise ModelError(f"structured pruning broke {old.where()}: expected output "
                             f"shape(s) {want}, got {got} ({new.name}); a size in that "
                             f"module's code did not follow the pruning. Protect the module "
                             f"(protect=[...]) to prune around it")
    old_shapes = [tuple(t.shape) for t in graph.trace.outputs]
    new_shapes = [tuple(t.shape) for t in replay.outputs]
    if old_shapes != new_shapes:
        raise ModelError(f"structured pruning changed the model's output shapes from "
                         f"{old_shapes} to {new_shapes}")


def size_attributes(model: nn.Module) -> dict[str, int]:
    """The :data:`SIZE_ATTRS` (and ``nf``) of every module, by ``path.attr``: what an artefact
    records so that :func:`reshape_template` can restore a pruned architecture."""
    out: dict[str, int] = {}
    for path, m in model.named_modules():
        for attr in (*SIZE_ATTRS, "nf"):
            value = m.__dict__.get(attr)
            if isinstance(value, int) and not isinstance(value, bool):
                out[f"{path}.{attr}" if path else attr] = value
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
    for key, value in (attributes or {}).items():
        path, _, attr = key.rpartition(".")
        m = modules.get(path)
        if m is not None and attr in m.__dict__ and m.__dict__[attr] != value:
            setattr(m, attr, value)
    return changed
