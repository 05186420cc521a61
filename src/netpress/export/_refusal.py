"""Clear refusals from :func:`netpress.export.onnx.export_onnx`: which op, in which module,
and what the user can do.

The TorchScript exporter reports an op without an ONNX form by its name only
(``UnsupportedOperatorError``), and a model it cannot trace with an internal error (a
custom ``autograd.Function``, an alias-analysis assert). :class:`ModuleStack` follows the
modules being run while the model is traced, so a failure inside the trace names the
module it happened in; for an op refused after the trace, :func:`op_module` exports once
more with a symbolic for that op that fails with its node, whose scope names the module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["ModuleStack", "unsupported_op", "op_module", "refusal_message", "scope_module"]

_OP = re.compile(r"operator '([\w:.]+)'")
_SCOPE = re.compile(r"scope: (\S+)")


class ModuleStack:
    """The names of the modules being run, innermost last (forward hooks on ``model``'s
    modules; ``skip`` leading names are dropped, e.g. the export's keyword wrapper)."""

    def __init__(self, model: nn.Module, skip: int = 0) -> None:
        self.model, self.skip = model, skip
        self.stack: list[str] = []
        self._handles: list[Any] = []

    def __enter__(self) -> ModuleStack:
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._push(name)))
            self._handles.append(module.register_forward_hook(self._pop()))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _push(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.stack.append(name)
        return hook

    def _pop(self) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if self.stack:
                self.stack.pop()
        return hook

    def innermost(self) -> str | None:
        """The innermost module still running (where a failure left the trace), as the
        user's model names it; None when none is."""
        return _user_name(self.stack[-1], self.skip) if self.stack else None


def _user_name(name: str, skip: int) -> str:
    parts = name.split(".")[skip:] if name else []
    return ".".join(parts) or "the model itself"


def unsupported_op(message: str) -> str | None:
    """The ATen op an exporter error names (``aten::histc``), if any."""
    found = _OP.search(message)
    return found.group(1) if found else None


def scope_module(message: str, skip: int = 0) -> str | None:
    """The module path in a TorchScript node scope quoted by an exporter error
    (``...Model::model/...Layer::layers.0/...`` → ``model.layers.0``)."""
    found = _SCOPE.search(message)
    if not found:
        return None
    names = [part.rsplit("::", 1)[-1] for part in found.group(1).split("/")]
    return _user_name(".".join(n for n in names if n), skip)


def _raising_symbolic(op: str) -> Callable[..., Any]:
    def symbolic(g: Any, *inputs: Any, **attrs: Any) -> Any:
        from torch.onnx import errors

        node = getattr(g, "original_node", None)
        scope = node.scopeName() if node is not None else ""
        message = f"netpress: {op} found; scope: {scope} "
        value = next((v for v in inputs if isinstance(v, torch._C.Value)), None)
        if value is None:
            raise errors.OnnxExporterError(message)
        raise errors.SymbolicValueError(message, value)
    return symbolic


@contextmanager
def _registered(op: str, opset: int) -> Iterator[None]:
    from netpress.export._symbolics import forget_new_ops, known_ops

    before = known_ops()
    torch.onnx.register_custom_op_symbolic(op, _raising_symbolic(op), opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(op, opset)
        forget_new_ops([op], before)


def op_module(export: Callable[[], None], op: str, opset: int, skip: int = 0) -> str | None:
    """The module in which the exporter meets ``op`` (``export()`` run once more with a
    symbolic for ``op`` that fails naming its node); None when it cannot be told."""
    if not re.fullmatch(r"\w+::\w+", op):
        return None
    try:
        with _registered(op, opset):
            export()
    except Exception as exc:  # the failure we asked for, or another on the way there
        message = str(exc)
        return scope_module(message, skip) if f"netpress: {op} found" in message else None
    return None


_OPSET = re.compile(r"added in version (\d+)")


def refusal_message(reason: str, op: str | None, module: str | None,
                    module_type: str | None = None) -> str:
    """``export_onnx``'s refusal: the reason, the op and module, and what to do."""
    where = f" (in module {module!r}" + (f", a {module_type})" if module_type else ")") \
        if module else ""
    cause = f"PyTorch's TorchScript ONNX exporter has no ONNX form for {op}" if op else \
        "PyTorch's TorchScript ONNX exporter cannot convert this model"
    newer = _OPSET.search(reason)
    if newer:
        advice = f"export with export_onnx(..., opset={newer.group(1)})"
    elif module:
        advice = "replace that module by one made of exportable ops, or run this model " \
            "in PyTorch rather than ONNX Runtime"
    else:
        advice = "change the model so it does not need this, or run it in PyTorch rather " \
            "than ONNX Runtime"
    reason = " ".join(reason.split("[Caused by")[0].split())
    return f"export_onnx: {reason}: {cause}{where}, so netpress cannot export this model " \
        f"to ONNX; {advice}"
