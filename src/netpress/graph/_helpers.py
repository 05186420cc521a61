"""Small helpers shared by the op rules."""

from __future__ import annotations

from typing import Any

import torch

from netpress.graph.spaces import Spaces
from netpress.graph.trace import OpRecord, tensors_in


def _ins(rec: OpRecord) -> list[torch.Tensor]:
    return list(tensors_in((rec.args, rec.kwargs)))


def _arg(rec: OpRecord, pos: int, name: str, default: Any = None) -> Any:
    if name in rec.kwargs:
        return rec.kwargs[name]
    return rec.args[pos] if len(rec.args) > pos else default


def _broadcast(S: Spaces, t: torch.Tensor, out: torch.Tensor) -> None:
    """Align ``t`` to ``out`` from the right; equal sizes map one to one."""
    for k in range(1, min(t.dim(), out.dim()) + 1):
        if t.shape[-k] == out.shape[-k]:
            S.union_dims(t, -k, out, -k)
        elif t.shape[-k] != 1:
            S.fix_tensor(t, [t.dim() - k])
            S.fix_tensor(out, [out.dim() - k])


def _elementwise(S: Spaces, rec: OpRecord) -> None:
    for out in rec.outputs:
        for t in _ins(rec):
            _broadcast(S, t, out)


def _dims_of(value: Any, ndim: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [value % ndim]
    return [int(v) % ndim for v in value]


def _opaque(S: Spaces, rec: OpRecord) -> None:
    for t in _ins(rec) + rec.outputs:
        S.fix_tensor(t)
