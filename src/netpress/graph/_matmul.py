"""Rules of the ops that multiply channels together: matmul and its batched/fused forms,
linear, grouped (mixture-of-experts) matmul, einsum and scaled dot-product attention. Each
records its MACs as a product of the sizes of the dimensions it multiplies."""

from __future__ import annotations

import numpy as np
import torch

from netpress.graph._helpers import _arg, _broadcast, _opaque
from netpress.graph.spaces import Spaces
from netpress.graph.trace import OpRecord

__all__ = ["matmul", "addmm", "linear", "grouped_mm", "einsum", "sdpa"]


def _contract_dims(S: Spaces, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                   where: str) -> None:
    """``out = a @ b`` with numpy matmul semantics."""
    a2 = a if a.dim() > 1 else None
    b2 = b if b.dim() > 1 else None
    S.union_dims(a, -1, b, -2 if b2 is not None else 0)
    spaces = [S.key(out, d) for d in range(out.dim())] + [S.key(a, -1)]
    S.add_macs(1, spaces, where)
    if a2 is not None and b2 is not None:
        S.union_dims(a, -2, out, -2)
        S.union_dims(b, -1, out, -1)
        for t in (a, b):
            for k in range(3, t.dim() + 1):
                if t.shape[-k] == out.shape[-k]:
                    S.union_dims(t, -k, out, -k)
    elif a2 is not None:
        for k in range(2, a.dim() + 1):
            S.union_dims(a, -k, out, -k + 1)
    elif b2 is not None:
        S.union_dims(b, -1, out, -1)


def matmul(S: Spaces, rec: OpRecord) -> None:
    a, b = rec.args[0], rec.args[1]
    if rec.name == "__rmatmul__":
        a, b = b, a
    _contract_dims(S, a, b, rec.outputs[0], rec.where())


def grouped_mm(S: Spaces, rec: OpRecord) -> None:
    """``grouped_mm(a [M, K], b [G, K, N], offs)``: row block ``g`` of ``a`` times ``b[g]``
    (mixture-of-experts layers). Channel ``k`` of every expert goes with column ``k`` of
    ``a``, output channel ``n`` of every expert with column ``n`` of the output; the expert
    dim is fixed. Other forms keep every dim whole."""
    a, b, out = rec.args[0], _arg(rec, 1, "mat_b"), rec.outputs[0]
    if a.dim() != 2 or b.dim() != 3 or out.dim() != 2:
        _opaque(S, rec)
        return
    S.union_dims(a, 1, b, 1)
    S.union_dims(out, 1, b, 2)
    S.union_dims(a, 0, out, 0)
    S.fix(S.ids(b, 0))
    per = max(1, 16 // b.element_size())  # the kernel wants 16-byte aligned rows
    S.align(S.ids(b, 1), per)
    S.align(S.ids(b, 2), per)
    S.add_macs(1, [S.key(out, 0), S.key(out, 1), S.key(a, 1)], rec.where())


def addmm(S: Spaces, rec: OpRecord) -> None:
    names = ("batch1", "batch2") if rec.name == "baddbmm" else ("mat1", "mat2")
    bias, a, b = _arg(rec, 0, "input"), _arg(rec, 1, names[0]), _arg(rec, 2, names[1])
    out = rec.outputs[0]
    _contract_dims(S, a, b, out, rec.where())
    _broadcast(S, bias, out)


def linear(S: Spaces, rec: OpRecord) -> None:
    x, w = rec.args[0], _arg(rec, 1, "weight")
    b = _arg(rec, 2, "bias")
    out = rec.outputs[0]
    S.union_dims(x, -1, w, 1)
    S.union_dims(out, -1, w, 0)
    if b is not None:
        S.union_dims(b, 0, w, 0)
    for k in range(2, x.dim() + 1):
        S.union_dims(x, -k, out, -k)
    S.add_macs(1, [S.key(out, d) for d in range(out.dim())] + [S.key(w, 1)], rec.where())


def sdpa(S: Spaces, rec: OpRecord) -> None:
    q, k, v = rec.args[0], _arg(rec, 1, "key"), _arg(rec, 2, "value")
    mask = _arg(rec, 3, "attn_mask")
    out = rec.outputs[0]
    S.union_dims(q, -2, out, -2)
    S.union_dims(k, -2, v, -2)
    S.fix_tensor(q, [q.dim() - 1])  # head_dim sets the default scale
    S.union_dims(q, -1, k, -1)
    S.union_dims(v, -1, out, -1)
    for j in range(3, q.dim() + 1):
        S.union_dims(q, -j, out, -j)
        for t in (k, v):
            if t.dim() < j:
                continue
            nq, nk = int(q.shape[-j]), int(t.shape[-j])
            if nq == nk:
                S.union_dims(q, -j, t, -j)
            elif nk and nq % nk == 0:  # grouped-query attention: a kv head and its q heads
                S.union(S.ids(t, -j)[np.arange(nq) // (nq // nk)], S.ids(q, -j))
            else:
                S.fix_tensor(t, [t.dim() - j])
    if isinstance(mask, torch.Tensor):  # broadcast against the scores [..., L, S]
        for j in range(1, mask.dim() + 1):
            ref, dim = (k, -2) if j == 1 else (q, -j)
            if j <= ref.dim() and mask.shape[-j] != 1 and mask.shape[-j] == ref.shape[dim]:
                S.union_dims(mask, -j, ref, dim)
    rows = [S.key(q, d) for d in range(q.dim() - 1)] + [S.key(k, -2)]
    S.add_macs(1, rows + [S.key(q, -1)], rec.where())
    S.add_macs(1, rows + [S.key(v, -1)], rec.where())


def einsum(S: Spaces, rec: OpRecord) -> None:
    eq = str(rec.args[0]).replace(" ", "")
    ops = list(rec.args[1]) if len(rec.args) == 2 and isinstance(rec.args[1], (list, tuple)) \
        else list(rec.args[1:])
    out = rec.outputs[0]
    if "..." in eq or "->" not in eq:
        for t in ops + [out]:
            S.fix_tensor(t)
        return
    lhs, rhs = eq.split("->")
    terms = list(zip(lhs.split(","), ops)) + [(rhs, out)]
    first: dict[str, tuple[torch.Tensor, int]] = {}
    for letters, t in terms:
        for d, c in enumerate(letters):
            if c in first:
                S.union_dims(first[c][0], first[c][1], t, d)
            else:
                first[c] = (t, d)
    S.add_macs(1, [S.key(t, d) for t, d in first.values()], rec.where())
