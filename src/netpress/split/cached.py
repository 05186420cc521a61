"""Training on cached head outputs: the head and the teacher run once per training input.

When both stages leave the head fixed and it is still the original model's
(:func:`netpress.split.frozen_head.same_module`), everything the training needs from the
device side and from the teacher is a function of the input alone: the head's output ``h``
(stage 1's target *and* the bottleneck's input) and the original model's output
``teacher_tail(h)`` (stage 2's target). :func:`build_cache` computes both once, in one pass
over the training data (``h`` stored as float16 by default: half the memory, well inside the
bottleneck's own quantization error), and :func:`fit_cached` then trains from the cache for
any number of steps: stage 1 costs only the small bottleneck, stage 2 the bottleneck plus
the student's tail, neither the head nor the teacher. Each epoch reshuffles the cache; an
augmenting training loader is sampled once (one augmented copy per image).

The loop is the recovery loop's (optimizer, cosine schedule, masks re-applied after each
step) with one difference: parameter groups, so the pretrained tail can train at its own
learning rate (``Split(tail_lr=...)``) while the new bottleneck trains at ``lr``.

After a rate-free stage 1 (``Split(stage1_rate=0)``) the learned entropy model has not seen
the codes; :func:`fit_prior` fits it to them (rate only, the encoder fixed) before stage 2
weighs the rate against the output loss, so the rate term starts from the codes' actual
cost instead of an untrained density's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from netpress._inputs import call_model, move_to, primary_output
from netpress.data import batches
from netpress.errors import DataError, ModelError
from netpress.recover.loop import LossFn
from netpress.split.bottleneck import Bottleneck

__all__ = ["HeadCache", "build_cache", "fit_cached", "fit_prior", "TARGETS"]

#: What a cached stage's loss compares the module's output with: the head's output itself
#: (stage 1, the bottleneck rebuilding it) or the original model's output (stage 2).
TARGETS = ("head", "output")


@dataclass
class HeadCache:
    """Head outputs ``h``, the original model's outputs ``logits`` and the ``labels`` (or
    None) of the training inputs, in the order of one pass over the data; ``batch`` is that
    data's batch size."""

    h: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor | None
    batch: int

    def __len__(self) -> int:
        return int(self.h.shape[0])

    def batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        """One epoch of shuffled ``(h, logits, labels-or-empty)`` batches (``h`` as float32);
        the last, smaller batch is dropped unless it is the only one."""
        order = torch.randperm(len(self), generator=generator)
        n = len(self) if len(self) < self.batch else len(self) - len(self) % self.batch
        for i in range(0, n, self.batch):
            idx = order[i:i + self.batch]
            labels = self.labels[idx] if self.labels is not None else torch.empty(0)
            yield self.h[idx].float(), self.logits[idx], labels


@torch.no_grad()
def build_cache(data: Any, head: nn.Module, teacher_tail: nn.Module, device: torch.device,
                dtype: torch.dtype = torch.float16) -> HeadCache:
    """One pass over ``data``: the head's outputs (stored as ``dtype``) and the teacher
    tail's outputs on them; both modules run in eval mode."""
    head.eval()
    teacher_tail.eval()
    hs: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    batch = 0
    for inputs, y in batches(data, name="Split train"):
        h = primary_output(call_model(head, move_to(inputs, device)))
        if not isinstance(h, torch.Tensor):
            raise ModelError("Split(cache_head=True): the head's output is not one tensor; "
                             "use cache_head=False")
        hs.append(h.to(dtype))
        outs.append(primary_output(call_model(teacher_tail, h)).float())
        if isinstance(y, torch.Tensor):
            labels.append(y.to(device))
        batch = max(batch, int(h.shape[0]))
    if not hs:
        raise DataError("Split(cache_head=True): the train data gave no batches")
    kept = torch.cat(labels) if len(labels) == len(hs) else None
    return HeadCache(torch.cat(hs), torch.cat(outs), kept, batch)


def _optimizer(groups: list[dict[str, Any]], name: str, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr)


def fit_cached(module: nn.Module, cache: HeadCache, loss_fn: LossFn, target: str, *,
               steps: int, groups: list[tuple[list[nn.Parameter], float]], optimizer: str,
               after_step: Callable[[nn.Module], None] | None = None,
               seed: int = 0) -> dict[str, Any]:
    """``steps`` optimizer steps of ``module`` on shuffled cache batches, ``loss_fn(
    module(h), ref, labels)`` with ``ref`` the batch's ``h`` or teacher outputs (``target``,
    one of :data:`TARGETS`), each parameter
    group ``(params, lr)`` at its own learning rate under one cosine schedule; parameters
    with ``requires_grad=False`` are left out. ``after_step`` runs after each step (masks)."""
    kept = [([p for p in ps if p.requires_grad], lr) for ps, lr in groups]
    kept = [(ps, lr) for ps, lr in kept if ps]
    if not kept:
        raise ModelError("Split: this training stage has no trainable parameters")
    opt = _optimizer([{"params": ps, "lr": lr} for ps, lr in kept], optimizer, kept[0][1])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    gen = torch.Generator().manual_seed(seed)
    module.train()
    step, running = 0, float("nan")
    while step < steps:
        for h, logits, labels in cache.batches(gen):
            out = primary_output(module(h))
            loss = loss_fn(out, h if target == "head" else logits,
                           labels if labels.numel() else None)
            if not torch.isfinite(loss):
                raise ModelError(f"Split: the loss became {loss.item()} at step {step} of a "
                                 f"cached stage; lower lr or tail_lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(module)
            value = float(loss.detach())
            running = value if math.isnan(running) else 0.9 * running + 0.1 * value
            step += 1
            if step >= steps:
                break
    module.eval()
    return {"steps": step, "final_loss": round(running, 6), "cached": True,
            "cache_inputs": len(cache)}


def fit_prior(bottleneck: Bottleneck, cache: HeadCache, *, steps: int, lr: float,
              seed: int = 2) -> dict[str, Any]:
    """``steps`` Adam steps (cosine schedule) of the bottleneck's entropy model alone on the
    codes its encoder gives the cached head outputs: minimise their noisy rate (bits per
    input) with the encoder fixed (eval mode, no gradients). Returns the steps and the last
    rate, in bits per input."""
    prior = bottleneck.prior
    if prior is None:
        raise ModelError("Split: fit_prior needs a bottleneck with a learned entropy model "
                         "(entropy='factorized')")
    encoder, qmax = bottleneck.encoder, float(bottleneck.quant.qmax)
    was_training = encoder.training
    encoder.eval()
    opt = torch.optim.Adam(prior.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    gen = torch.Generator().manual_seed(seed)
    step, bits = 0, float("nan")
    while step < steps:
        for h, _, _ in cache.batches(gen):
            with torch.no_grad():
                z = torch.clamp(encoder(h), 0.0, qmax)
            loss = prior.noisy_bits(z)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bits, step = float(loss.detach()), step + 1
            if step >= steps:
                break
    encoder.train(was_training)
    return {"steps": step, "final_bits": round(bits, 3)}
