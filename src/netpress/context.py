"""The state a recipe's steps share while they run.

A :class:`Context` carries the frozen reference model, the user's data arguments, the seed,
and the masks that unstructured pruning keeps applied through recovery. It is created by
:func:`netpress.compress` for one call and thrown away afterwards: there is no global state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from netpress._cow import own_
from netpress.data import Data
from netpress.errors import DataError, ModelError
from netpress.prune.masks import cubic_sparsity

__all__ = ["Context", "PruneSchedule", "MaskFn", "Projection"]

MaskFn = Callable[[nn.Module, float], dict[str, torch.Tensor]]
#: Projects a model's weights in place onto a method's compressed set (the C-step of L-C);
#: returns the keep-masks it applied (empty when the method does not prune).
Projection = Callable[[nn.Module], dict[str, torch.Tensor]]


@dataclass
class PruneSchedule:
    """A gradual pruning ramp driven by the training steps of the recovery that follows it.

    ``masks_at(model, progress)`` computes keep-masks (by parameter name) at a fraction
    ``progress`` in [0, 1] of the method's final sparsity. Progress follows the cubic ramp
    ``1 - (1 - t/T)^3`` over the first ``ramp_end`` fraction of the recovery steps, updated
    ``updates`` times, and reaches 1 at ``t = ramp_end * total``.
    """

    owner: str
    masks_at: MaskFn
    ramp_end: float = 0.7
    updates: int = 10
    current: float = 0.0
    final: float = 1.0

    def target(self, step: int, total: int) -> float:
        ramp = max(1, int(round(self.ramp_end * total)))
        every = max(1, ramp // max(1, self.updates))
        reached = min(ramp, (step // every) * every)
        return 1.0 if step >= ramp else cubic_sparsity(reached, ramp, 1.0)


@dataclass
class Context:
    """What one :func:`netpress.compress` call shares between its steps."""

    reference: nn.Module
    device: torch.device
    example_inputs: Any = None
    calibration: Data | None = None
    train: Data | None = None
    evaluate: Data | None = None
    seed: int = 0
    progress: bool = False
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    schedules: list[PruneSchedule] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    projections: dict[str, Projection] = field(default_factory=dict)

    def fork(self, **changes: Any) -> Context:
        """An independent copy for a trial run (own masks, ramps and records)."""
        ramps = [dataclasses.replace(s) for s in self.schedules]
        return dataclasses.replace(self, masks=dict(self.masks), schedules=ramps, records=[],
                                   projections=dict(self.projections), **changes)

    def add_projection(self, owner: str, projection: Projection) -> None:
        """Register how to project weights onto ``owner``'s compressed set."""
        self.projections[owner] = projection

    def require(self, name: str, by: str) -> Any:
        """The data argument ``name`` (train, calibration, evaluate, example_inputs) or an error."""
        value = getattr(self, name)
        if value is None:
            raise DataError(f"{by} needs `{name}=` data; pass it to compress()")
        return value

    def record(self, step: str, **info: Any) -> None:
        """Note what a step did; it appears in the report's ``steps`` list."""
        self.records.append({"step": step, **info})

    # -- masks ---------------------------------------------------------------------------
    def set_masks(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        """Merge keep-masks (a weight pruned once stays pruned) and apply them now."""
        for name, mask in masks.items():
            old = self.masks.get(name)
            mask = mask.to(torch.bool)
            self.masks[name] = mask if old is None or old.shape != mask.shape else mask & old
        self.apply_masks(model)

    @torch.no_grad()
    def apply_masks(self, model: nn.Module) -> None:
        """Zero every masked weight (called after each optimizer step during recovery)."""
        for name, mask in self.masks.items():
            try:
                param = model.get_parameter(name)
            except AttributeError:
                raise ModelError(f"mask for {name!r} has no parameter in the model; a step "
                                 f"removed or renamed it") from None
            if param.shape != mask.shape:
                raise ModelError(f"mask for {name!r} has shape {tuple(mask.shape)} but the "
                                 f"parameter now has {tuple(param.shape)}")
            # masked_fill_ writes +0.0 (mul_ would leave -0.0 on negative weights, which costs
            # a sign bit per zero in the artefact).
            # (own_: a weight still shared with the caller's model is copied first)
            own_(param).masked_fill_(~mask.to(device=param.device), 0.0)

    def mask_sparsity(self) -> float | None:
        """Fraction of masked-out weights over all masked tensors (None without masks)."""
        total = sum(m.numel() for m in self.masks.values())
        if not total:
            return None
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / total

    def add_schedule(self, schedule: PruneSchedule) -> None:
        self.schedules.append(schedule)

    def before_train_step(self, model: nn.Module, step: int, total: int) -> None:
        """Advance gradual-pruning ramps to ``step`` of ``total``; update masks when they move."""
        for sched in self.schedules:
            target = sched.target(step, total)
            if target > sched.current + 1e-12:
                self.set_masks(model, sched.masks_at(model, target))
                sched.current = target

    def finish_schedules(self, model: nn.Module) -> list[str]:
        """Bring every ramp to its final sparsity; returns the owners that were finished."""
        done = []
        for sched in self.schedules:
            if sched.current < sched.final:
                self.set_masks(model, sched.masks_at(model, sched.final))
                sched.current = sched.final
            done.append(sched.owner)
        self.schedules.clear()
        return done
