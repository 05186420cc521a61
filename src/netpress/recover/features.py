"""Per-layer feature distillation: the outputs of named modules of the student are pulled
towards the same modules' outputs in the reference.

:func:`feature_capture` hooks the modules in both models for the duration of a recovery
loop and keeps each one's latest output; :func:`netpress.recover.losses.feature_loss` turns
the pairs into a scalar. After a one-shot compression that keeps the shapes of block outputs
(a refit structured prune with whole residual streams, unstructured pruning, quantization)
every block then gets its own target, not only the logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from netpress._inputs import primary_output
from netpress.errors import ModelError
from netpress.select import select_names

__all__ = ["FeaturePairs", "feature_capture"]


class FeaturePairs:
    """The latest output of each hooked module in the student and in the reference."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.student: dict[str, torch.Tensor] = {}
        self.reference: dict[str, torch.Tensor] = {}

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(student, reference)`` outputs of every module seen in both this step."""
        out = []
        for n in self.names:
            s, t = self.student.get(n), self.reference.get(n)
            if s is None or t is None:
                continue
            if s.shape != t.shape:
                raise ModelError(f"Distill: features of {n!r} differ in shape ({tuple(s.shape)} "
                                 f"in the model, {tuple(t.shape)} in the reference); choose "
                                 "modules whose outputs keep their shape (features=...)")
            out.append((s, t))
        self.student.clear()
        self.reference.clear()
        return out


def _hook(store: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
    def fn(_module: nn.Module, _args: Any, output: Any) -> None:
        store[name] = primary_output(output)
    return fn


@contextmanager
def feature_capture(student: nn.Module, reference: nn.Module,
                    patterns: Sequence[str]) -> Iterator[FeaturePairs]:
    """Hook the modules of ``student`` named by ``patterns`` (names or ``re:`` patterns) and
    the same names in ``reference``; yields the :class:`FeaturePairs` they fill."""
    names = select_names([n for n, _ in student.named_modules() if n], patterns,
                         owner="Distill", what="feature module")
    ref_names = dict(reference.named_modules())
    missing = [n for n in names if n not in ref_names]
    if missing:
        raise ModelError(f"Distill: feature modules {missing[:5]} are not in the reference "
                         "model; choose modules both models have")
    store = FeaturePairs(names)
    handles = [student.get_submodule(n).register_forward_hook(_hook(store.student, n))
               for n in names]
    handles += [ref_names[n].register_forward_hook(_hook(store.reference, n)) for n in names]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
