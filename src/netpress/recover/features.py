"""Per-layer feature distillation: the outputs of named modules of the student are pulled
towards the same modules' outputs in the reference.

:func:`feature_capture` hooks the modules in both models for the duration of a recovery
loop and keeps each one's latest output; :func:`netpress.recover.losses.feature_loss` turns
the pairs into a scalar. After a one-shot compression that keeps the shapes of block outputs
(a refit structured prune with whole residual streams, unstructured pruning, quantization)
every block then gets its own target, not only the logits.

For text batches (dict inputs with an ``attention_mask``) the student's mask is kept too:
per-token features ``[batch, time, ...]`` then enter the loss at real tokens only, and the
models' own outputs can be compared mean-pooled over the real tokens (sentence embeddings,
:meth:`FeaturePairs.pooled_output`).

With ``local=True`` (block-local distillation) each hooked student module is called on the
reference's input to the same module instead of its own: every block then learns to reproduce
the original block from the original's input, independently of the (compressed) blocks before
it, and no gradient crosses from one block into another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from netpress._inputs import primary_output
from netpress.errors import ModelError
from netpress.recover.losses import mean_pool, real_tokens
from netpress.select import select_names

__all__ = ["FeaturePairs", "feature_capture"]

_OUTPUT = "<output>"


class FeaturePairs:
    """The latest output of each hooked module in the student and in the reference, and the
    latest ``attention_mask`` the student was called with (None when there was none)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.student: dict[str, torch.Tensor] = {}
        self.reference: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self.inputs: dict[str, tuple[Any, dict[str, Any]]] = {}

    def _pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        s, t = self.student.get(name), self.reference.get(name)
        if s is None or t is None:
            return None
        if s.shape != t.shape:
            raise ModelError(f"Distill: features of {name!r} differ in shape ({tuple(s.shape)} "
                             f"in the model, {tuple(t.shape)} in the reference); choose "
                             "modules whose outputs keep their shape (features=...)")
        return s, t

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(student, reference)`` outputs of every module seen in both this step, reduced
        to the real tokens when the batch had an attention mask."""
        out = []
        for n in self.names:
            pair = self._pair(n)
            if pair is None:
                continue
            if self.mask is not None:
                s, t, _ = real_tokens(self.mask, pair[0], pair[1], None)
                assert t is not None
                pair = (s, t)
            out.append(pair)
        for n in self.names:  # in place: the hooks hold these dicts
            self.student.pop(n, None)
            self.reference.pop(n, None)
        return out

    def pooled_output(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The two models' outputs of this step, ``[batch, time, ...]`` mean-pooled over the
        real tokens (all tokens without a mask); None when the outputs were not captured."""
        pair = self._pair(_OUTPUT)
        self.student.pop(_OUTPUT, None)
        self.reference.pop(_OUTPUT, None)
        if pair is None:
            return None
        s, t = pair
        if s.dim() < 3:
            return s, t
        mask = self.mask if self.mask is not None and self.mask.shape == s.shape[:2] else \
            torch.ones(s.shape[:2], device=s.device)
        return mean_pool(s, mask), mean_pool(t, mask)


def _hook(store: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
    def fn(_module: nn.Module, _args: Any, output: Any) -> None:
        store[name] = primary_output(output)
    return fn


def _mask_hook(store: FeaturePairs) -> Callable[..., None]:
    def fn(_module: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        store.mask = mask if isinstance(mask, torch.Tensor) else None
    return fn


def _keep_input(store: FeaturePairs, name: str) -> Callable[..., None]:
    def fn(_module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        store.inputs[name] = (args, kwargs)
    return fn


def _shapes(args: Any) -> list[tuple[int, ...]]:
    return [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]


def _reference_input(store: FeaturePairs, name: str) -> Callable[..., Any]:
    """A pre-hook that swaps the student module's input for the reference's (once: a student
    call without a reference call before it, e.g. an evaluation, keeps its own input)."""
    def fn(_module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        ref = store.inputs.pop(name, None)
        if ref is None:
            return None
        if _shapes(ref[0]) != _shapes(args):
            raise ModelError(f"Distill(local=True): the input of {name!r} differs in shape "
                             f"({_shapes(args)} in the model, {_shapes(ref[0])} in the "
                             "reference); choose modules whose inputs keep their shape")
        return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in ref[0]), \
            {**kwargs, **ref[1]}
    return fn


@contextmanager
def feature_capture(student: nn.Module, reference: nn.Module, patterns: Sequence[str],
                    outputs: bool = False, local: bool = False) -> Iterator[FeaturePairs]:
    """Hook the modules of ``student`` named by ``patterns`` (names or ``re:`` patterns) and
    the same names in ``reference`` (with ``outputs``, the two models' own outputs too);
    yields the :class:`FeaturePairs` they fill. With ``local`` each of those student modules
    computes on the reference module's input (block-local distillation)."""
    names = select_names([n for n, _ in student.named_modules() if n], patterns,
                         owner="Distill", what="feature module") if patterns else []
    ref_names = dict(reference.named_modules())
    missing = [n for n in names if n not in ref_names]
    if missing:
        raise ModelError(f"Distill: feature modules {missing[:5]} are not in the reference "
                         "model; choose modules both models have")
    store = FeaturePairs(names)
    handles = [student.get_submodule(n).register_forward_hook(_hook(store.student, n))
               for n in names]
    handles += [ref_names[n].register_forward_hook(_hook(store.reference, n)) for n in names]
    handles.append(student.register_forward_pre_hook(_mask_hook(store), with_kwargs=True))
    if local:
        handles += [ref_names[n].register_forward_pre_hook(_keep_input(store, n),
                                                           with_kwargs=True) for n in names]
        handles += [student.get_submodule(n).register_forward_pre_hook(
            _reference_input(store, n), with_kwargs=True) for n in names]
    if outputs:
        handles.append(student.register_forward_hook(_hook(store.student, _OUTPUT)))
        handles.append(reference.register_forward_hook(_hook(store.reference, _OUTPUT)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
