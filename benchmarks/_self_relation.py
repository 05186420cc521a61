"""MiniLMv2 self-attention relation distillation added to ``Distill`` for the MiniLM
benchmarks (``lm_minilm_distill.py``), without a library option (it is kept here until it
helps): forward hooks record the queries, keys and values of chosen encoder layers in the
reference and the student, and the student's output hook adds the gradient of ``weight *
netpress.recover.losses.self_relation_kl`` (the loss itself is not in ``Distill``'s logged
value). Needs the live reference (no ``CachedTeacher``: its inner modules must run); relies
on ``Distill`` calling the reference before the student on each batch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from netpress.recover.losses import self_relation_kl

PARTS = ("query", "key", "value")


class _AddGradient(torch.autograd.Function):
    """Identity on ``out``; the backward also sends gradient 1 into ``extra`` (a scalar):
    the training loss becomes ``loss(out) + extra`` for the gradients."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones((), device=grad.device)


def relation_heads(widths: tuple[int, int], most: int) -> int:
    """The largest number of relation heads <= ``most`` dividing both widths."""
    g = math.gcd(*widths)
    return max(r for r in range(1, most + 1) if g % r == 0)


@contextmanager
def self_relation(student: torch.nn.Module, teacher: torch.nn.Module, layers: list[int],
                  weight: float, most_heads: int = 12) -> Iterator[list[float]]:
    """Hooks on ``student`` (before ``compress`` copies it: the copy keeps them) and
    ``teacher``; yields the list of the relation loss values of the training steps."""
    rec: dict[str, dict[str, torch.Tensor]] = {"s": {}, "t": {}}
    mask: dict[str, torch.Tensor] = {}
    values: list[float] = []

    def keep(role: str, name: str) -> Callable[..., None]:
        def fn(_m: torch.nn.Module, _a: Any, out: torch.Tensor) -> None:
            rec[role][name] = out
        return fn

    def keep_mask(_m: torch.nn.Module, _a: Any, kw: dict[str, Any]) -> None:
        mask["m"] = kw["attention_mask"]

    def inject(_m: torch.nn.Module, _a: Any, out: Any) -> Any:
        s, t = rec["s"], rec["t"]
        names = [f"{i}.{p}" for i in layers for p in PARTS]
        ready = torch.is_grad_enabled() and all(
            n in t and n in s and t[n].shape[:2] == s[n].shape[:2] for n in names)
        if ready:
            loss = out.last_hidden_state.new_zeros(())
            for i in layers:
                ss, tt = [tuple(r[f"{i}.{p}"] for p in PARTS) for r in (s, t)]
                heads = relation_heads((ss[0].shape[-1], tt[0].shape[-1]), most_heads)
                loss = loss + self_relation_kl(ss, tuple(x.detach() for x in tt),
                                               mask["m"], heads)
            loss = weight * loss / len(layers)
            values.append(float(loss.detach()))
            out["last_hidden_state"] = _AddGradient.apply(out.last_hidden_state, loss)
        s.clear()
        t.clear()
        return out

    handles = []
    for role, model in (("s", student), ("t", teacher)):
        for i in layers:
            att = model.encoder.layer[i].attention.self
            handles += [getattr(att, p).register_forward_hook(keep(role, f"{i}.{p}"))
                        for p in PARTS]
    handles.append(student.register_forward_pre_hook(keep_mask, with_kwargs=True))
    handles.append(student.register_forward_hook(inject))
    try:
        yield values
    finally:
        for h in handles:
            h.remove()


def strip(model: torch.nn.Module) -> torch.nn.Module:
    """Remove the hooks of :func:`self_relation` that ``compress``'s copy of the student
    kept (closures: the model could not be pickled with them); returns ``model``."""
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for k in [k for k, f in hooks.items()
                      if getattr(f, "__module__", "") == __name__]:
                del hooks[k]
                m._forward_pre_hooks_with_kwargs.pop(k, None)
                m._forward_hooks_with_kwargs.pop(k, None)
    return model
