"""An op-recording trace of one eager forward pass.

:func:`record` runs the model once on its example inputs under a
:class:`torch.overrides.TorchFunctionMode` that notes every torch function and tensor method
called, with its arguments and outputs, and the innermost module whose ``forward`` was
running. The user's Python runs as is, so data-dependent control flow (``transformers``
models) is no obstacle, and the cost is one forward pass. Nested calls inside a recorded
function (``F.multi_head_attention_forward`` calling ``linear``) are not descended into: the
mode is inactive while a recorded function runs.

Every tensor seen is kept alive for the trace's lifetime, so ``id(tensor)`` identifies it.

The sizes the model's code builds shapes from are tracked too (:mod:`.sizes`): each record
lists, in ``sizes``, which of its output dimensions took their size from a module attribute,
another tensor's size, or a literal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from netpress._inputs import Inputs, call_model
from netpress.graph.sizes import (
    Address,
    Expr,
    SizeTracker,
    SizeUse,
    note_value_uses,
    size_uses,
    wrap_shape,
)

__all__ = ["OpRecord", "Trace", "record", "tensors_in"]


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside ``obj`` (tensor, tuple, list, dict, ``ModelOutput``), in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from tensors_in(v)


def op_name(func: Callable[..., Any]) -> str:
    """A short name for a torch function or tensor method (``conv2d``, ``__getitem__``)."""
    name = getattr(func, "__name__", None)
    if name is None:
        name = repr(func)
    return str(name)


@dataclass
class OpRecord:
    """One recorded call: its name, arguments, tensor outputs and the module that ran it."""

    index: int
    name: str
    module: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[torch.Tensor]
    func: Callable[..., Any] | None = None
    sizes: list[SizeUse] = field(default_factory=list)

    def where(self) -> str:
        return f"op {self.name!r} in module {self.module or '<root>'!r}"


@dataclass
class Trace:
    """What one forward pass did: the ops, the model's inputs/outputs and its parameters.

    ``owners`` maps ``id`` of every parameter and buffer to the ``(module path, attribute)``
    pairs that hold it (several for tied weights).
    """

    records: list[OpRecord]
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    output: Any
    owners: dict[int, list[tuple[str, str]]]
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)
    addresses: list[Address] = field(default_factory=list)
    value_uses: list[Expr] = field(default_factory=list)
    equalities: list[Expr] = field(default_factory=list)

    def param_name(self, pid: int) -> str:
        path, attr = self.owners[pid][0]
        return f"{path}.{attr}" if path else attr


class _Recorder(TorchFunctionMode):
    def __init__(self, stack: list[str], keep: dict[int, torch.Tensor],
                 equal: list[Expr]) -> None:
        super().__init__()
        self.stack = stack
        self.keep = keep
        self.equal = equal
        self.records: list[OpRecord] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        if _is_size(name, out) and args and isinstance(args[0], torch.Tensor):
            self.keep[id(args[0])] = args[0]
            dim = 0 if name == "__len__" else (args[1] if len(args) > 1 else kwargs.get("dim"))
            return wrap_shape(args[0], out, dim, self.equal)
        if name in ("__get__", "__set__") and not isinstance(out, torch.Tensor):
            return out
        outs = list(tensors_in(out)) if isinstance(out, (torch.Tensor, tuple, list)) else []
        if name == "__setitem__" or (outs and not _is_shape_query(name)):
            if name in _ARITHMETIC:
                note_value_uses(args)
            for t in (*tensors_in(args), *tensors_in(kwargs), *outs):
                self.keep[id(t)] = t
            self.records.append(OpRecord(len(self.records), name, self.stack[-1], tuple(args),
                                         dict(kwargs), outs, func,
                                         size_uses(name, tuple(args), kwargs, outs)))
        return out


_ARITHMETIC = {"add", "sub", "mul", "div", "true_divide", "floor_divide", "pow", "__add__",
               "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
               "__rtruediv__", "__floordiv__", "__rfloordiv__", "__pow__", "__rpow__", "__iadd__",
               "__imul__", "__itruediv__", "__isub__", "multiply", "divide", "subtract", "rsub",
               "full", "full_like", "fill_", "masked_fill", "clamp", "clamp_min", "clamp_max"}


def _is_size(name: str, out: Any) -> bool:
    """A shape query whose sizes are tracked: ``x.shape``, ``x.size()``, ``x.size(d)``,
    ``len(x)``."""
    if isinstance(out, torch.Size):
        return name in ("size", "__get__")
    return name in ("size", "__len__") and isinstance(out, int) and not isinstance(out, bool)


def _is_shape_query(name: str) -> bool:
    return name in ("size", "dim", "numel", "__len__", "stride", "storage_offset")


def record(model: nn.Module, example_inputs: Inputs,
           records: list[OpRecord] | None = None) -> Trace:
    """Run ``model`` once on ``example_inputs`` (eval mode, no grad) and record its ops.

    ``records``: a list to record into (it holds the ops that ran when the forward raises).
    """
    stack = [""]
    handles = []
    for path, module in model.named_modules():
        def pre(m: nn.Module, a: Any, path: str = path) -> None:
            stack.append(path)

        def post(m: nn.Module, a: Any, o: Any) -> None:
            stack.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    keep: dict[int, torch.Tensor] = {}
    sizes = SizeTracker()
    recorder = _Recorder(stack, keep, sizes.equal)
    if records is not None:
        recorder.records = records
    was_training = model.training
    model.eval()
    try:
        sizes.install(model)
        with torch.no_grad(), recorder:
            output = call_model(model, example_inputs)
    finally:
        sizes.restore(model)
        for h in handles:
            h.remove()
        model.train(was_training)
    owners: dict[int, list[tuple[str, str]]] = {}
    for path, module in model.named_modules():
        for attr, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None:
                owners.setdefault(id(t), []).append((path, attr))
                keep[id(t)] = t
    inputs = list(tensors_in(example_inputs))
    outputs = list(tensors_in(output))
    for t in (*inputs, *outputs):
        keep[id(t)] = t
    return Trace(recorder.records, inputs, outputs, output, owners, keep, sizes.addresses,
                 sizes.values, sizes.equal)
