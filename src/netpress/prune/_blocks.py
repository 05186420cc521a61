"""Run a stack of transformer blocks one block at a time on calibration data.

One forward of the model records, for every calibration batch, what each block of the stack
(:func:`netpress.prune.depth.find_block_stack`) is called with: the hidden states (the first
positional argument, or ``hidden_states``/``src``) of the first block, and every other
argument of every block (attention masks, position embeddings, ...; shared tensors, so cheap
to keep). A block can then be run on its own with new hidden states
(:meth:`BlockCalls.run`): the layer-wise refits fit one block's layers, run the block, and
hand its outputs to the next one, so the calibration data crosses the model once. Cache
objects (``transformers``' key/value caches) are dropped from the recorded arguments: a
block run twice must not append to one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from netpress._inputs import call_model
from netpress.errors import ModelError
from netpress.measure.collect import evaluating

__all__ = ["BlockCalls", "hidden_of", "block_output", "forward_each"]

_HIDDEN_KEYS = ("hidden_states", "src", "x")


class _Stop(Exception):
    pass


def forward_each(model: nn.Module, data: list[Any], handles: list[Any],
                 stop: type[Exception], before: Callable[[Any], None] | None = None) -> None:
    """Run ``model`` (eval mode, no grad) on every batch of ``data``, ``before(batch)`` first;
    a hook raising ``stop`` ends that batch's forward. Removes the hook ``handles`` after."""
    try:
        with evaluating(model), torch.no_grad():
            for x in data:
                if before is not None:
                    before(x)
                try:
                    call_model(model, x)
                except stop:
                    pass
    finally:
        for h in handles:
            h.remove()


def hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden-state input of a block call."""
    x = args[0] if args else next((kwargs[k] for k in _HIDDEN_KEYS if k in kwargs), None)
    if not isinstance(x, torch.Tensor):
        raise ModelError("a transformer block was called without its hidden states as the "
                         "first argument (or hidden_states=)")
    return x


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ModelError(f"a transformer block returned {type(out).__name__}; expected its hidden "
                     "states (a tensor or a tuple starting with one)")


def _without_caches(value: Any) -> Any:
    return None if "cache" in type(value).__name__.lower() else value


def _check_chained(shapes: dict[tuple[str, int], Any], blocks: int) -> None:
    """Each block's hidden-state input must have the shape of the previous block's output
    (its first item): layer-wise refits feed one block's outputs to the next. Pvt's longest
    stack, its per-stage patch embeddings, takes images first and token maps after, with
    blocks of other stacks in between."""
    for i in range(1, blocks):
        before, now = shapes.get(("out", i - 1)), shapes.get(("in", i))
        if before != now:
            raise ModelError(f"block {i} of the stack takes hidden states shaped {now} where "
                             f"block {i - 1} returns {before}: the blocks are not chained "
                             "(something runs between them); layer-wise refits need a plain "
                             "stack of blocks")


@dataclass
class _Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_key: str | None  # None: the hidden states are args[0]


@dataclass
class BlockCalls:
    """The calls of every block for every calibration batch (see the module docs).

    ``hidden[b]``: the current hidden states of batch ``b`` (the first block's input until
    :meth:`advance` moves them on); ``real[b]``: its real-token mask (``[B, T]``) or None.
    """

    hidden: list[torch.Tensor]
    real: list[torch.Tensor | None]
    calls: list[list[_Call]] = field(default_factory=list)  # [block][batch]

    @classmethod
    def record(cls, model: nn.Module, stack: nn.ModuleList, data: list[Any]) -> BlockCalls:
        """One forward of ``model`` per batch, stopped after the last block (what follows
        the stack, e.g. a language-model head, does not run)."""
        calls: list[list[_Call]] = [[] for _ in stack]
        hidden: list[torch.Tensor] = []
        shapes: dict[tuple[str, int], Any] = {}  # ("in" / "out", block): of the first call

        def hook(i: int) -> Callable[..., Any]:
            def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                x = hidden_of(args, kwargs)
                key = None if args else next(k for k in _HIDDEN_KEYS if k in kwargs)
                rest = {k: _without_caches(v) for k, v in kwargs.items() if k != key}
                calls[i].append(_Call(tuple(args[1:]), rest, key))
                shapes.setdefault(("in", i), tuple(x.shape))
                if i == 0:
                    hidden.append(x.detach())
                return None
            return fn

        def output(i: int) -> Callable[..., Any]:
            def fn(module: nn.Module, args: Any, out: Any) -> None:
                if isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and out
                                                     and isinstance(out[0], torch.Tensor)):
                    shapes.setdefault(("out", i), tuple(block_output(out).shape))
                else:
                    shapes.setdefault(("out", i), type(out).__name__)
            return fn

        def skip(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 out: Any) -> Any:
            if module is stack[len(stack) - 1]:
                raise _Stop
            return None

        handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True)
                   for i, b in enumerate(stack)]
        handles += [b.register_forward_hook(output(i)) for i, b in enumerate(stack)]
        handles.append(stack[len(stack) - 1].register_forward_hook(skip, with_kwargs=True))
        forward_each(model, data, handles, _Stop)
        if any(len(c) != len(data) for c in calls):
            raise ModelError("the blocks of the stack were not each called once per forward; "
                             "layer-wise refits need a plain stack of blocks")
        _check_chained(shapes, len(stack))
        mask = [x.get("attention_mask") if isinstance(x, dict) else None for x in data]
        real = [m.bool() if isinstance(m, torch.Tensor) and m.shape == h.shape[:2] else None
                for m, h in zip(mask, hidden)]
        return cls(hidden, real, calls)

    def run(self, block: nn.Module, index: int, batch: int,
            hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``index`` on batch ``batch`` (its current hidden states unless given)."""
        call = self.calls[index][batch]
        x = self.hidden[batch] if hidden is None else hidden
        with torch.no_grad():
            if call.hidden_key is None:
                return block_output(block(x, *call.args, **call.kwargs))
            return block_output(block(*call.args, **{call.hidden_key: x, **call.kwargs}))

    def advance(self, block: nn.Module, index: int) -> None:
        """Replace every batch's hidden states by block ``index``'s outputs."""
        with evaluating(block):
            self.hidden = [self.run(block, index, b) for b in range(len(self.hidden))]

    def rows(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """The real-token rows of a ``[B, T, ...]`` tensor of batch ``batch`` (every row of
        anything else), flattened to ``[n, last dim]``."""
        real = self.real[batch]
        if real is not None and t.dim() >= 3 and t.shape[:2] == real.shape:
            return t[real].reshape(-1, t.shape[-1])
        return t.reshape(-1, t.shape[-1])
