"""Early stopping on agreement with the reference, for the recovery loop.

:class:`AgreementMonitor` counts how many held-out inputs the model being recovered assigns
the reference's top-1 class, keeps a copy of the weights with the best count (masks are
applied before every check, so the copy respects them), stops the loop after ``patience``
checks without improvement, and restores the best copy at the end. The reference's
predictions on the held-out data are computed once.

The held-out data is either every ``round(1/validation_fraction)``-th batch of the train
data (which the loop then does not train on), or the ``evaluate=`` data of the compression.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netpress.context import Context
from netpress.data import Data, split_batches
from netpress.errors import DataError
from netpress.measure.collect import collect_many, collect_outputs

__all__ = ["AgreementMonitor", "EARLY_STOP_SOURCES", "agreement_count", "split_for_monitor"]

#: Where the held-out data for early stopping comes from.
EARLY_STOP_SOURCES = ("held_out", "evaluate")


def agreement_count(ref_pred: torch.Tensor, logits: torch.Tensor) -> int:
    """How many rows of ``logits`` have the top-1 class given in ``ref_pred``."""
    return int((logits.argmax(-1) == ref_pred).sum())


def split_for_monitor(data: Data, ctx: Context, source: str, fraction: float,
                      by: str) -> tuple[Data, Data]:
    """``(train_on, watch)``: the batches to train on and those to measure agreement on."""
    if source == "evaluate":
        return data, ctx.require("evaluate", f"{by} (early_stop_data='evaluate')")
    train_on, watch = split_batches(data, fraction)
    if not any(True for _ in watch) or not any(True for _ in train_on):
        raise DataError(f"{by}: early stopping holds out every {watch.every}-th train batch, "
                        f"which leaves one side empty; pass more train batches or set "
                        f"early_stop_patience=None")
    return train_on, watch


class AgreementMonitor:
    """Track agreement on ``watch`` every ``every`` steps, keep the best weights, and say when
    ``patience`` checks in a row brought no improvement."""

    def __init__(self, ctx: Context, watch: Data, *, every: int, patience: int) -> None:
        self.ctx, self.watch, self.every, self.patience = ctx, watch, every, patience
        (ref_out,), _, _ = collect_many([ctx.reference], watch, device=ctx.device)
        self.ref_pred = ref_out.argmax(-1)
        self.best = -1
        self.best_step = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale = 0
        self.history: list[tuple[int, int]] = []

    def check(self, model: nn.Module, step: int, *, eligible: bool = True) -> bool:
        """Measure at ``step``; True when the loop should stop. ``eligible=False`` (a pruning
        ramp still moving) measures without keeping the weights or counting patience."""
        out, _ = collect_outputs(model, self.watch, device=self.ctx.device)
        count = agreement_count(self.ref_pred, out)
        self.history.append((step, count))
        if not eligible:
            return False
        if count >= self.best:  # on a tie keep the later, more trained weights
            self.stale = 0 if count > self.best else self.stale + 1
            self.best, self.best_step = count, step
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.stale += 1
        return self.stale >= self.patience

    def due(self, step: int, total: int) -> bool:
        """Whether ``step`` (1-based count of steps done) is a checkpoint."""
        return step % self.every == 0 or step >= total

    def restore(self, model: nn.Module) -> dict[str, Any]:
        """Load the best weights into ``model`` (with masks reapplied); returns a summary."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
            self.ctx.apply_masks(model)
        n = int(self.ref_pred.numel())
        return {"best_step": self.best_step, "checks": len(self.history),
                "best_agreement": round(self.best / n, 6) if n and self.best >= 0 else None,
                "held_out": n}
