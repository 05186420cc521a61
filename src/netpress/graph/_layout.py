"""Rules of the layout ops: reshape/view/flatten, permute, expand, repeat, cat, stack,
split/chunk/unbind, indexing and slicing, and padding (see :mod:`netpress.graph.rules`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from netpress.graph._helpers import _arg, _broadcast
from netpress.graph.spaces import Spaces
from netpress.graph.trace import OpRecord


def _segments(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up runs of dims of shapes ``a`` and ``b`` with equal products (size-1 dims skipped)."""
    ia = [i for i, s in enumerate(a) if s != 1]
    ib = [i for i, s in enumerate(b) if s != 1]
    out: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        sa, sb = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        while pa != pb:
            if pa < pb:
                i += 1
                if i >= len(ia):
                    return None
                sa.append(ia[i])
                pa *= a[ia[i]]
            else:
                j += 1
                if j >= len(ib):
                    return None
                sb.append(ib[j])
                pb *= b[ib[j]]
        out.append((sa, sb))
        i += 1
        j += 1
    return out if i == len(ia) and j == len(ib) else None


def reshape_map(S: Spaces, x: torch.Tensor, out: torch.Tensor) -> None:
    """Couple a reshape's dims. Equal dims map one to one; where one dim splits into several
    (or several merge into one), one factor carries the channel (see :func:`resolve_products`)
    and the other factors are fixed."""
    for t in (x, out):  # every dim gets its elements (resolve_products reads them)
        for d in range(t.dim()):
            S.ids(t, d)
    segs = _segments(list(x.shape), list(out.shape))
    if segs is None:
        S.fix_tensor(x)
        S.fix_tensor(out)
        return
    for da, db in segs:
        if len(da) == 1 and len(db) == 1:
            S.union_dims(x, da[0], out, db[0])
        elif len(da) == 1:
            S.products.append((x, da[0], out, db))
        elif len(db) == 1:
            S.products.append((out, db[0], x, da))
        else:
            _merge_outer(S, x, da, out, db)


def _merge_outer(S: Spaces, x: torch.Tensor, da: list[int], out: torch.Tensor,
                 db: list[int]) -> None:
    """Several dims to several dims: the outermost factors carry, every other dim is fixed."""
    total = math.prod(int(x.shape[d]) for d in da)
    flat = np.arange(total)
    a_ids, b_ids = S.ids(x, da[0]), S.ids(out, db[0])
    S.union(a_ids[flat // (total // a_ids.size)], b_ids[flat // (total // b_ids.size)])
    for d in da[1:]:
        S.fix(S.ids(x, d))
    for d in db[1:]:
        S.fix(S.ids(out, d))


def _product(S: Spaces, flat_t: torch.Tensor, flat_d: int, t: torch.Tensor, dims: list[int],
             carrier: int) -> None:
    """``flat_t``'s dim ``flat_d`` is the row-major product of ``t``'s ``dims``: couple each
    flat element with its index along the ``carrier`` factor; fix the other factors."""
    c = carrier
    flat = S.ids(flat_t, flat_d)
    inner = math.prod(int(t.shape[d]) for d in dims[dims.index(c) + 1:])
    size = int(t.shape[c])
    S.union(flat, S.ids(t, c)[(np.arange(flat.size) // inner) % size])
    for d in dims:
        if d != c:
            S.fix(S.ids(t, d))


def resolve_products(S: Spaces, fixed_label: np.ndarray | None, labels: np.ndarray | None) -> None:
    """Apply the pending split/merge relations. The carrier is the outermost factor that the
    other ops leave removable (from a first pass: ``labels`` and ``fixed_label``), so a fused
    ``[3 * heads * head_dim] -> [3, heads, head_dim]`` split carries the heads, not q/k/v.
    The innermost factor (usually ``head_dim``) carries only when every outer one is fixed:
    ``[2 * C] -> [2, C]`` (a literal 2: a gate and its value) carries the channels."""
    for flat_t, flat_d, t, dims in S.products:
        carrier = dims[0]
        if fixed_label is not None and labels is not None:
            free = [d for d in dims if S.size[(id(t), d)] > 1 and not fixed_label[
                labels[S.base[(id(t), d)]:S.base[(id(t), d)] + S.size[(id(t), d)]]].all()]
            carrier = next((d for d in free if d != dims[-1]), free[0] if free else dims[0])
        _product(S, flat_t, flat_d, t, dims, carrier=carrier)
    S.products.clear()


def _reshape(S: Spaces, rec: OpRecord) -> None:
    x = rec.args[0]
    reshape_map(S, x, rec.outputs[0])


_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def _permute(S: Spaces, rec: OpRecord, func: Callable[..., Any] | None) -> None:
    x, out = rec.args[0], rec.outputs[0]
    if func is None or x.dim() > len(_PRIMES) or x.dim() != out.dim():
        S.fix_tensor(x)
        S.fix_tensor(out)
        return
    probe = torch.empty(_PRIMES[: x.dim()], device="meta")
    shape = list(func(probe, *rec.args[1:], **rec.kwargs).shape)
    for k, s in enumerate(shape):
        S.union_dims(x, _PRIMES.index(s), out, k)


def _expand(S: Spaces, rec: OpRecord) -> None:
    _broadcast(S, rec.args[0], rec.outputs[0])


def _repeat(S: Spaces, rec: OpRecord) -> None:
    x, out = rec.args[0], rec.outputs[0]
    for k in range(1, x.dim() + 1):
        n, m = int(x.shape[-k]), int(out.shape[-k])
        a, b = S.ids(x, -k), S.ids(out, -k)
        S.union(a[np.arange(m) % n], b)


def _repeat_interleave(S: Spaces, rec: OpRecord) -> None:
    x, out = rec.args[0], rec.outputs[0]
    reps, dim = _arg(rec, 1, "repeats"), _arg(rec, 2, "dim")
    if not isinstance(reps, int) or dim is None or x.dim() != out.dim():
        S.fix_tensor(x)
        S.fix_tensor(out)
        return
    dim = dim % x.dim()
    for d in range(x.dim()):
        if d == dim:
            S.union(S.ids(x, d)[np.arange(out.shape[d]) // reps], S.ids(out, d))
        else:
            S.union_dims(x, d, out, d)


def _cat(S: Spaces, rec: OpRecord) -> None:
    parts = [t for t in rec.args[0] if t.numel() or t.dim() > 1]
    out = rec.outputs[0]
    dim = _arg(rec, 1, "dim", 0) % out.dim()
    offset = 0
    for t in parts:
        for d in range(out.dim()):
            if d == dim:
                n = int(t.shape[d])
                S.union(S.ids(t, d), S.ids(out, d)[offset:offset + n])
                offset += n
            else:
                S.union_dims(t, d, out, d)


def _stack(S: Spaces, rec: OpRecord) -> None:
    out = rec.outputs[0]
    dim = _arg(rec, 1, "dim", 0) % out.dim()
    S.fix(S.ids(out, dim))
    for t in rec.args[0]:
        for d in range(t.dim()):
            S.union_dims(t, d, out, d + (d >= dim))


def _split(S: Spaces, rec: OpRecord) -> None:
    x, outs = rec.args[0], rec.outputs
    dim = _arg(rec, 2 if rec.name != "unbind" else 1, "dim", 0) % x.dim()
    if rec.name == "unbind":
        S.fix(S.ids(x, dim))
        for o in outs:
            for d in range(o.dim()):
                S.union_dims(x, d + (d >= dim), o, d)
        return
    offset = 0
    xs = S.ids(x, dim)
    for o in outs:
        n = int(o.shape[dim])
        for d in range(x.dim()):
            if d == dim:
                S.union(xs[offset:offset + n], S.ids(o, d))
            else:
                S.union_dims(x, d, o, d)
        offset += n
    sizes = {int(o.shape[dim]) for o in outs}
    if len(outs) > 1 and len(sizes) == 1 and rec.name in ("split", "chunk"):
        # equal pieces stay equal (chunk, split(int)): couple same positions
        n = sizes.pop()
        S.union(xs[: n], xs[n: n * len(outs)].reshape(len(outs) - 1, n))
    elif len(outs) > 1 and rec.name in ("tensor_split", "chunk"):
        S.fix(xs)  # piece sizes follow from the total: they would move
    # pieces of given sizes (split([a, b, c])) are independent ranges; their sizes are
    # literals (fixed by the size rules) or attributes/shapes that surgery keeps in step


def _getitem(S: Spaces, rec: OpRecord) -> None:
    x, out = rec.args[0], rec.outputs[0]
    idx = rec.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, (torch.Tensor, list)) or i is True or i is False for i in idx):
        _index_by_tensor(S, x, out, idx)
        return
    used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    items: list[Any] = []
    for i in idx:
        items.extend([slice(None)] * (x.dim() - used) if i is Ellipsis else [i])
    items.extend([slice(None)] * (x.dim() - sum(1 for i in items if i is not None)))
    din = dout = 0
    for i in items:
        if i is None:
            dout += 1
        elif isinstance(i, slice):
            n = int(x.shape[din])
            if i.indices(n) == (0, n, 1):
                S.union_dims(x, din, out, dout)
            else:
                S.fix(S.ids(x, din))
                S.fix(S.ids(out, dout))
            din += 1
            dout += 1
        else:
            S.fix(S.ids(x, din))
            din += 1


def _index_by_tensor(S: Spaces, x: torch.Tensor, out: torch.Tensor, idx: tuple[Any, ...]) -> None:
    """``x[:, ..., index, ...]`` with one integer index tensor and full slices elsewhere: the
    indexed dim is fixed (a lookup, e.g. a relative-position table), the others map."""
    tensors = [k for k, i in enumerate(idx) if isinstance(i, torch.Tensor)]
    for k in tensors:  # index tensors' elements are positions: every one stays
        S.fix_tensor(idx[k])
    full = all(isinstance(i, slice) and i == slice(None) for k, i in enumerate(idx)
               if k not in tensors)
    if len(tensors) != 1 or not full or idx[tensors[0]].dtype in (torch.bool, torch.uint8):
        S.fix_tensor(x)
        S.fix_tensor(out)
        return
    pos, index = tensors[0], idx[tensors[0]]
    if out.dim() != x.dim() - 1 + index.dim():
        S.fix_tensor(x)
        S.fix_tensor(out)
        return
    S.fix(S.ids(x, pos))
    for d in range(x.dim()):
        if d < pos:
            S.union_dims(x, d, out, d)
        elif d > pos:
            S.union_dims(x, d, out, d - 1 + index.dim())
    for d in range(pos, pos + index.dim()):
        S.fix(S.ids(out, d))


def _index_select(S: Spaces, rec: OpRecord) -> None:
    x, out = rec.args[0], rec.outputs[0]
    index = _arg(rec, 2, "index")
    if isinstance(index, torch.Tensor):
        S.fix_tensor(index)
    S.couple_except(x, out, {_arg(rec, 1, "dim") % x.dim()})


def _narrow_select(S: Spaces, rec: OpRecord) -> None:
    x, out = rec.args[0], rec.outputs[0]
    dim = _arg(rec, 1, "dim") % x.dim()
    S.fix(S.ids(x, dim))
    for d in range(x.dim()):
        if d == dim:
            continue
        if rec.name == "select":
            S.union_dims(x, d, out, d - (d > dim))
        else:
            S.union_dims(x, d, out, d)
    if rec.name != "select":
        S.fix(S.ids(out, dim))


def _pad(S: Spaces, rec: OpRecord) -> None:
    x, out = rec.args[0], rec.outputs[0]
    pad = list(_arg(rec, 1, "pad"))
    mode = _arg(rec, 2, "mode", "constant")
    for d in range(x.dim()):
        k = x.dim() - 1 - d
        lo, hi = (pad[2 * k], pad[2 * k + 1]) if 2 * k + 1 < len(pad) else (0, 0)
        if lo == 0 and hi == 0:
            S.union_dims(x, d, out, d)
        elif mode != "constant" or lo < 0 or hi < 0:
            S.fix(S.ids(x, d))
            S.fix(S.ids(out, d))
        else:  # the input maps to a sub-range; padded elements can never be removed
            o = S.ids(out, d)
            S.union(S.ids(x, d), o[lo:lo + x.shape[d]])
            S.fix(o[:lo])
            S.fix(o[lo + x.shape[d]:])
