"""Channel dependency groups: which parameter slices must be removed together.

:func:`analyze` records one forward pass (:mod:`.trace`), applies the op rules
(:mod:`.rules`) and takes connected components. A *unit* is one removable component: a
channel, a neuron, a whole conv group, or an attention head (all its q/k/v rows and output
columns). Units touching the same parameter dimensions form a :class:`Group` (e.g. the 16
output channels of ``layer1.0.conv1`` with ``bn1`` and the input columns of ``conv2``).
A unit is removable unless one of its elements is fixed: a model input or output dimension,
a constant slice, the padded part of a padding, a size written as a literal in the model's
code, or a layer the user protects. A unit with an element that feeds a statistic over its
dimension (a normalised dimension: the hidden size of a transformer, a channel of a global
response norm) is removable but *inexact*: removing it changes the model's function even
when its weights are zero. A group is exact when all its units are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from netpress._inputs import Inputs
from netpress.graph.rules import apply_rule, resolve_products
from netpress.graph.spaces import SpaceKey, Spaces
from netpress.graph.trace import OpRecord, Trace, record, tensors_in
from netpress.select import matches

__all__ = ["Group", "ChannelGraph", "Unsupported", "analyze", "explain"]


@dataclass
class Unsupported:
    """An op without a rule whose tensors carry removable channels."""

    where: str
    units: int


@dataclass
class Group:
    """Units (component labels) coupled to the same parameter dimensions.

    ``slices[key][u]`` are the positions of unit ``u`` along parameter space ``key``
    (``(id(param), dim)``); ``width`` is a unit's extent in channels (1 for a channel,
    ``head_dim`` for a head): its smallest extent along the first dim of a weight matrix.
    ``exact``: removing a unit whose weights are zero leaves the model's outputs unchanged
    (False for units that feed a norm's statistics, e.g. the hidden size). ``align``: kept
    channel counts must be multiples of it (a kernel's alignment).
    """

    name: str
    units: np.ndarray
    slices: dict[SpaceKey, list[np.ndarray]]
    width: int
    modules: list[str] = field(default_factory=list)
    exact: bool = True
    align: int = 1

    def __len__(self) -> int:
        return int(self.units.size)


@dataclass
class ChannelGraph:
    """The channel-coupling map of one model for one example input."""

    trace: Trace
    spaces: Spaces
    labels: np.ndarray
    groups: list[Group]
    unsupported: list[Unsupported]
    blocked: np.ndarray  # per label: cannot be removed
    soft: np.ndarray | None = None  # per label: removable, but not exactly (see Group.exact)
    in_params: np.ndarray | None = None  # per label: has elements in a parameter/buffer
    _macs: _Products | None = field(default=None, repr=False)
    _params: _Products | None = field(default=None, repr=False)

    def param(self, pid: int) -> torch.Tensor:
        return self.trace.tensors[pid]

    def param_spaces(self) -> list[SpaceKey]:
        return [k for k in self.spaces.base if k[0] in self.trace.owners]

    def removed(self, key: SpaceKey, pruned: np.ndarray) -> np.ndarray:
        """Boolean mask over space ``key``: elements whose unit is in ``pruned`` (a label mask)."""
        b, n = self.spaces.base[key], self.spaces.size[key]
        return pruned[self.labels[b:b + n]]

    def kept_size(self, key: SpaceKey, pruned: np.ndarray) -> int:
        return int(self.spaces.size[key] - self.removed(key, pruned).sum())

    def macs(self, pruned: np.ndarray) -> int:
        """MACs of the matmul/conv/attention ops with the ``pruned`` units removed."""
        if self._macs is None:
            self._macs = _Products.of(self, [(t.const, t.spaces) for t in self.spaces.macs])
        return self._macs.total(pruned)

    def params(self, pruned: np.ndarray) -> int:
        """Elements of the traced parameters (each once) with the ``pruned`` units removed."""
        if self._params is None:
            terms = []
            for pid in self.trace.owners:
                t = self.trace.tensors[pid]
                if isinstance(t, nn.Parameter):
                    keys = [(pid, d) for d in range(t.dim()) if (pid, d) in self.spaces.base]
                    terms.append((math.prod(int(s) for d, s in enumerate(t.shape)
                                            if (pid, d) not in self.spaces.base), keys))
            self._params = _Products.of(self, terms)
        return self._params.total(pruned)

    def why_fixed(self) -> tuple[np.ndarray, list[str]]:
        """Per label, the index (into the returned list) of the first rule that fixed one of
        its elements (-1: not fixed): the op and module, or 'a model input or output'."""
        reason = np.full(self.blocked.size, -1, dtype=np.int64)
        if not self.spaces.fixed:
            return reason, []
        ids = np.concatenate(self.spaces.fixed)
        which = np.repeat(np.arange(len(self.spaces.fixed)),
                          [a.size for a in self.spaces.fixed])
        labs, first = np.unique(self.labels[ids], return_index=True)
        reason[labs] = which[first]
        return reason, list(self.spaces.fixed_by)

    def held(self, pruned: np.ndarray, top: int = 4,
             kind: str = "macs") -> list[tuple[str, int, list[str]]]:
        """What remains with ``pruned`` removed, most first: ``(op and module, or parameter
        name; its MACs or parameter count; why its channels stay: the rules that fixed
        them)``. ``kind``: ``macs`` or ``params``. Only channels (dims coupled to a
        parameter) count as reasons, not the batch, space or sequence dims."""
        reason, why = self.why_fixed()
        if self.in_params is not None:
            reason = np.where(self.in_params, reason, -1)
        terms: list[tuple[str, int, list[SpaceKey]]]
        if kind == "macs":
            terms = [(t.where, t.const, t.spaces) for t in self.spaces.macs]
        else:
            terms = []
            for pid in self.trace.owners:
                t = self.trace.tensors[pid]
                if isinstance(t, nn.Parameter):
                    keys = [(pid, d) for d in range(t.dim()) if (pid, d) in self.spaces.base]
                    rest = math.prod(int(s) for d, s in enumerate(t.shape)
                                     if (pid, d) not in self.spaces.base)
                    terms.append((self.trace.param_name(pid), rest, keys))
        total: dict[str, int] = {}
        causes: dict[str, set[str]] = {}
        sizes: dict[SpaceKey, int] = {}
        for where, const, keys in terms:
            prod = const
            for key in keys:
                if key not in sizes:
                    sizes[key] = self.kept_size(key, pruned)
                prod *= sizes[key]
            total[where] = total.get(where, 0) + prod
            found = causes.setdefault(where, set())
            for key in keys:
                b, n = self.spaces.base[key], self.spaces.size[key]
                r = reason[self.labels[b:b + n]]
                found.update(why[i] for i in np.unique(r[r >= 0]).tolist()[:3]
                             if why[i] != where)
        ranked = sorted(total, key=lambda w: -total[w])[:top]
        return [(w, total[w], sorted(causes[w])) for w in ranked]

    def label_mask(self, units: Iterable[int]) -> np.ndarray:
        mask = np.zeros(self.blocked.size, dtype=bool)
        mask[np.fromiter(units, dtype=np.int64)] = True
        return mask


@dataclass
class _Products:
    """Sums of ``const * prod(kept sizes of spaces)`` evaluated for many pruning masks at
    once-built index arrays: one ``bincount`` and one ``prod`` per evaluation (the policy
    evaluates hundreds of candidate masks)."""

    labels: np.ndarray  # element labels of every space used, concatenated
    segment: np.ndarray  # the space (0..k-1) of each of those elements
    sizes: np.ndarray  # full size of each space
    index: np.ndarray  # terms x factors: space index, k (a size of 1) as padding
    const: np.ndarray

    @staticmethod
    def of(graph: ChannelGraph, terms: list[tuple[int, list[SpaceKey]]]) -> _Products:
        order: dict[SpaceKey, int] = {}
        for _, keys in terms:
            for key in keys:
                order.setdefault(key, len(order))
        S = graph.spaces
        keys = list(order)
        labels = [graph.labels[S.base[k]:S.base[k] + S.size[k]] for k in keys]
        width = max((len(k) for _, k in terms), default=0)
        index = np.full((len(terms), max(1, width)), len(keys), dtype=np.int64)
        for i, (_, ks) in enumerate(terms):
            index[i, :len(ks)] = [order[k] for k in ks]
        return _Products(
            np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
            np.repeat(np.arange(len(keys)), [x.size for x in labels]),
            np.array([S.size[k] for k in keys], dtype=np.int64),
            index, np.array([c for c, _ in terms], dtype=np.int64))

    def total(self, pruned: np.ndarray) -> int:
        removed = np.bincount(self.segment, weights=pruned[self.labels],
                              minlength=self.sizes.size)
        kept = np.append(self.sizes - removed.astype(np.int64), 1)
        return int((self.const * kept[self.index].prod(axis=1)).sum())


def _owner_modules(trace: Trace, pid: int) -> list[str]:
    return [path for path, _ in trace.owners.get(pid, [])]


def _build_spaces(trace: Trace) -> tuple[Spaces, list[tuple[str, list[torch.Tensor]]]]:
    S = Spaces()
    unknown: list[tuple[str, list[torch.Tensor]]] = []
    produced: set[int] = set()
    for rec in trace.records:
        S.current = rec.where()
        try:
            known_op = apply_rule(S, rec, rec.func)
        except Exception:  # a call form the rule does not expect: treat the op as unknown
            known_op = False
        if not known_op:
            tensors = list(tensors_in((rec.args, rec.kwargs))) + rec.outputs
            for t in tensors:
                S.mark_unknown(t, rec.where())
            unknown.append((rec.where(), tensors))
        _size_rules(S, rec, trace)
        produced.update(id(o) for o in rec.outputs)
    known = produced | set(trace.owners) | {id(t) for t in trace.inputs}
    S.current = "a model input or output"
    for t in (*trace.inputs, *trace.outputs):
        S.fix_tensor(t)
    S.current = "a tensor from outside the trace"
    for rec in trace.records:  # tensors from outside the trace (plain attributes) stay whole
        for t in tensors_in((rec.args, rec.kwargs)):
            if id(t) not in known:
                S.fix_tensor(t)
                known.add(id(t))
    return S, unknown


def _size_rules(S: Spaces, rec: OpRecord, trace: Trace) -> None:
    """Sizes the code builds a shape from. A literal (``view(b, n, 12, 64)``) cannot follow
    pruning: the dimension it sets keeps its size. A size read from another tensor's shape
    (``reshape(b, x.shape[-1], h, w)``) must stay equal to it: the two dimensions are pruned
    together, position by position."""
    for use in rec.sizes:
        if use.out >= len(rec.outputs) or use.dim >= rec.outputs[use.out].dim():
            continue
        out = rec.outputs[use.out]
        n = int(out.shape[use.dim])
        if use.expr[0] == "const" and n > 1:
            S.current = f"the literal size {use.expr[1]} in {rec.where()}"
            S.fix(S.ids(out, use.dim))
        elif use.expr[0] == "dim":
            src = trace.tensors.get(use.expr[1])
            if src is not None and use.expr[2] < src.dim() and int(src.shape[use.expr[2]]) == n:
                S.union_dims(out, use.dim, src, use.expr[2])
    S.current = rec.where()


def _protected_params(model: nn.Module, trace: Trace, protect: Iterable[str]) -> set[int]:
    patterns = list(protect)
    if not patterns:
        return set()
    out = set()
    for pid, owners in trace.owners.items():
        if any(matches(p, path) or any(matches(p, m) for m in _prefixes(path))
               for path, _ in owners for p in patterns):
            out.add(pid)
    return out


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def analyze(model: nn.Module, example_inputs: Inputs, *, protect: Iterable[str] = (),
            exclude_unsupported: bool = False) -> ChannelGraph:
    """Trace ``model`` on ``example_inputs`` and compute its channel dependency groups.

    ``protect``: module names or ``re:`` patterns whose parameters keep every channel (a
    module protects its submodules too). Units touched by an op without a rule are listed
    in ``unsupported``; with ``exclude_unsupported`` they are also made unremovable.
    """
    trace = record(model, example_inputs)
    S, _ = _build_spaces(trace)
    first = S.components()  # without the splits/merges: which factors stay removable
    resolve_products(S, _fixed_labels(S, first), first)
    labels = S.components()
    blocked = _fixed_labels(S, labels)
    _block_whole_spaces(trace, S, labels, blocked)
    for pid in _protected_params(model, trace, protect):
        for d in range(trace.tensors[pid].dim()):
            if (pid, d) in S.base:
                b, n = S.base[(pid, d)], S.size[(pid, d)]
                blocked[labels[b:b + n]] = True
    unknown_where: dict[int, str] = {}
    for ids, where in S.unknown:
        for lab in np.unique(labels[ids]):
            unknown_where.setdefault(int(lab), where)
    nlab = blocked.size
    in_params = np.zeros(nlab, dtype=bool)
    for key, b in S.base.items():
        if key[0] in trace.owners:
            in_params[labels[b:b + S.size[key]]] = True
    counts: dict[str, int] = {}
    for lab, where in unknown_where.items():
        if not blocked[lab] and in_params[lab]:
            counts[where] = counts.get(where, 0) + 1
            if exclude_unsupported:
                blocked[lab] = True
    unsupported = [Unsupported(w, n) for w, n in counts.items()]
    soft = np.zeros(nlab, dtype=bool)
    if S.soft:
        soft[labels[np.concatenate(S.soft)]] = True
    soft &= ~blocked
    align = np.ones(nlab, dtype=np.int64)
    for ids, multiple in S.aligned:
        np.maximum.at(align, labels[ids], multiple)
    groups = _groups(trace, S, labels, blocked)
    for g in groups:
        g.exact = not bool(soft[g.units].any())
        g.align = int(align[g.units].max())
    return ChannelGraph(trace, S, labels, groups, unsupported, blocked, soft, in_params)


def _fixed_labels(S: Spaces, labels: np.ndarray) -> np.ndarray:
    nlab = int(labels.max()) + 1 if labels.size else 0
    blocked = np.zeros(nlab, dtype=bool)
    if S.fixed:
        blocked[labels[np.concatenate(S.fixed)]] = True
    return blocked


def _block_whole_spaces(trace: Trace, S: Spaces, labels: np.ndarray,
                        blocked: np.ndarray) -> None:
    """A unit spanning a whole parameter dimension would empty it: never removable."""
    for key, b in S.base.items():
        if key[0] in trace.owners:
            lab = labels[b:b + S.size[key]]
            if lab.size and (lab == lab[0]).all():
                blocked[lab[0]] = True


def explain(graph: ChannelGraph, param: str, dim: int) -> list[str]:
    """Why the channels of ``param`` (a state_dict name) along ``dim`` cannot all be removed:
    the ops that fixed an element coupled to them (empty when they are all removable)."""
    pid = next((p for p in graph.trace.owners if graph.trace.param_name(p) == param), None)
    if pid is None or (pid, dim) not in graph.spaces.base:
        raise KeyError(f"no traced parameter {param!r} with a dimension {dim}")
    b, n = graph.spaces.base[(pid, dim)], graph.spaces.size[(pid, dim)]
    wanted = set(np.unique(graph.labels[b:b + n]).tolist())
    out: list[str] = []
    for ids, why in zip(graph.spaces.fixed, graph.spaces.fixed_by):
        if why not in out and wanted & set(np.unique(graph.labels[ids]).tolist()):
            out.append(why)
    return out


def _groups(trace: Trace, S: Spaces, labels: np.ndarray, blocked: np.ndarray) -> list[Group]:
    per_unit: dict[int, dict[SpaceKey, np.ndarray]] = {}
    for key, b in S.base.items():
        if key[0] not in trace.owners:
            continue
        lab = labels[b:b + S.size[key]]
        free = ~blocked[lab]
        if not free.any():
            continue
        pos = np.nonzero(free)[0]
        order = np.argsort(lab[pos], kind="stable")
        pos = pos[order]
        uniq, starts = np.unique(lab[pos], return_index=True)
        bounds = [*starts.tolist(), pos.size]
        for i, u in enumerate(uniq.tolist()):  # slicing: np.split costs ~10x per piece
            per_unit.setdefault(u, {})[key] = pos[bounds[i]:bounds[i + 1]]
    by_sig: dict[tuple[SpaceKey, ...], list[int]] = {}
    for u, spaces in per_unit.items():
        sig = tuple(sorted(spaces, key=lambda k: S.base[k]))
        by_sig.setdefault(sig, []).append(u)
    groups = []
    for sig, units in by_sig.items():
        units.sort(key=lambda u: int(per_unit[u][sig[0]][0]))
        slices = {k: [per_unit[u][k] for u in units] for k in sig}
        # a unit's extent in channels: along the first dim of weight matrices (a conv's
        # output channels, a head's head_dim rows), else along any coupled dim
        main = [v for k, v in slices.items() if k[1] == 0 and trace.tensors[k[0]].dim() >= 2]
        width = min(min(len(p) for p in v) for v in (main or list(slices.values())))
        pid, dim = sig[0]
        name = f"{trace.param_name(pid)}[dim {dim}]"
        mods = sorted({m for k in sig for m in _owner_modules(trace, k[0])})
        groups.append(Group(name, np.asarray(units, dtype=np.int64), slices, width, mods))
    groups.sort(key=lambda g: min(S.base[k] for k in g.slices))
    return groups


def unit_elements(graph: ChannelGraph) -> dict[int, int]:
    """Elements per unit over all parameter spaces (for reports)."""
    out: dict[int, int] = {}
    for g in graph.groups:
        for k, per in g.slices.items():
            rest = math.prod(int(s) for i, s in enumerate(graph.param(k[0]).shape) if i != k[1])
            for u, p in zip(g.units.tolist(), per):
                out[u] = out.get(u, 0) + len(p) * rest
    return out
