"""Calls rewritten while :func:`netpress.export.onnx.export_onnx` traces a model, for calls
the TorchScript tracer records in a form its own passes then reject.

``Tensor.scatter(dim, index, value)`` with a Python ``bool`` value (the sparse-attention
indexers of DeepSeek-V3.2, GLM-MoE-DSA, AXK2, HY-V4 build their key mask as
``ones(..., dtype=bool).scatter(-1, topk, False)``) is recorded with a ``bool`` scalar
that no ``aten::scatter`` schema takes, and the tracer's alias analysis stopped on an
internal assert. The value becomes a tensor of ``self``'s dtype shaped like ``index``
(``scatter(dim, index, src)``), which computes the same thing and exports as ONNX
``ScatterElements``.

Complex values (``torch.polar``, ``torch.view_as_complex``; Llama 4's rotary embedding) are
carried as real pairs and ``torch.view_as_real`` stacks them back (``_complex.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from netpress.export._complex import complex_call

__all__ = ["TracingRewrites"]

_SCATTERS: frozenset[Callable[..., Any]] = frozenset(
    {torch.Tensor.scatter, torch.Tensor.scatter_, torch.scatter})


def _filled(index: torch.Tensor, value: bool, dtype: torch.dtype) -> torch.Tensor:
    """A tensor shaped like ``index`` holding ``value`` (ones/zeros: ``full_like`` with a
    bool fill meets the same tracer assert)."""
    return (torch.ones_like if value else torch.zeros_like)(index, dtype=dtype)


def _bool_value_as_src(args: tuple[Any, ...], kwargs: dict[str, Any]
                       ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(self, dim, index, value: bool)`` as ``(self, dim, index, src)``; other calls
    unchanged."""
    if len(args) >= 4 and isinstance(args[3], bool) and not kwargs:
        x, dim, index, value = args[:4]
        return (x, dim, index, _filled(index, value, x.dtype), *args[4:]), {}
    if len(args) == 3 and isinstance(kwargs.get("value"), bool) and len(kwargs) == 1:
        x, dim, index = args
        return (x, dim, index, _filled(index, kwargs["value"], x.dtype)), {}
    return args, kwargs


class TracingRewrites(TorchFunctionMode):
    """The rewrites above, active while the exporter traces the model."""

    def __torch_function__(self, func: Callable[..., Any], types: Any,
                           args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                           ) -> Any:
        kwargs = dict(kwargs or {})
        if func in _SCATTERS:
            args, kwargs = _bool_value_as_src(args, kwargs)
        split = complex_call(func, args, kwargs)
        return func(*args, **kwargs) if split is NotImplemented else split
