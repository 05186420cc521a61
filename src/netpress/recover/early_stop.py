"""Early stopping on agreement with the reference, for the recovery loop.

:class:`AgreementMonitor` scores the model being recovered against the reference on
held-out inputs, keeps a copy of the weights with the best score (masks are applied before
every check, so the copy respects them), stops the loop after ``patience`` checks without
improvement, and restores the best copy at the end. The reference's side is computed once.
The score follows the model's output (:func:`batch_score`): top-1 agreement for logits
(per real token for a language model's ``[batch, tokens, vocab]``), the mean cosine of
the sentence embeddings (hidden states mean-pooled over real tokens) for a model that
returns hidden states. Text batches may differ in length: they are scored batch by batch.

The held-out data is either every ``round(1/validation_fraction)``-th batch of the train
data (which the loop then does not train on), or the ``evaluate=`` data of the compression.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netpress._inputs import call_model, move_to, primary_output, token_mask
from netpress.context import Context
from netpress.data import Data, batches, split_batches
from netpress.errors import DataError
from netpress.measure.collect import evaluating
from netpress.measure.text import mean_pool

__all__ = ["AgreementMonitor", "EARLY_STOP_SOURCES", "agreement_count", "batch_score",
           "split_for_monitor"]

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


def _returns_hidden_states(raw: Any) -> bool:
    return getattr(raw, "last_hidden_state", None) is not None and \
        getattr(raw, "logits", None) is None


def _target(raw: Any, inputs: Any, hidden: bool) -> torch.Tensor:
    """What a batch's output is compared on: unit sentence embeddings (``hidden``), else the
    top-1 classes (per position for per-token logits)."""
    out = primary_output(raw).float()
    if not hidden:
        return out.argmax(-1)
    if out.dim() == 3:
        mask = token_mask(inputs)
        out = mean_pool(out, None if mask is None else mask.to(out.device))
    return torch.nn.functional.normalize(out.flatten(1), dim=-1)


def batch_score(ref: torch.Tensor, cmp: torch.Tensor, inputs: Any,
                hidden: bool) -> tuple[float, int]:
    """``(score, count)`` of one batch from :func:`_target` values: the summed cosine of the
    embeddings (``hidden``), else the number of matching top-1 classes, counted at the real
    tokens only when the classes run along a padded sequence."""
    if hidden:
        return float((ref * cmp).sum()), int(ref.shape[0])
    same = cmp == ref
    mask = token_mask(inputs)
    if same.dim() == 2 and mask is not None and tuple(mask.shape) == tuple(same.shape):
        keep = mask.to(same.device)
        return float((same & keep).sum()), int(keep.sum())
    return float(same.sum()), int(same.numel())


class AgreementMonitor:
    """Track agreement on ``watch`` every ``every`` steps, keep the best weights, and say when
    ``patience`` checks in a row brought no improvement."""

    def __init__(self, ctx: Context, watch: Data, *, every: int, patience: int) -> None:
        self.ctx, self.watch, self.every, self.patience = ctx, watch, every, patience
        self.hidden = False
        self.targets: list[torch.Tensor] = []
        with torch.no_grad(), evaluating(ctx.reference):
            for index, (inputs, _) in enumerate(batches(watch, name="early-stop data")):
                raw = call_model(ctx.reference, move_to(inputs, ctx.device))
                if index == 0:  # the first batch tells what the outputs are
                    self.hidden = _returns_hidden_states(raw)
                self.targets.append(_target(raw, inputs, self.hidden))
        self.count = 0
        self.best = -1.0
        self.best_step = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale = 0
        self.history: list[tuple[int, float]] = []

    def score(self, model: nn.Module) -> float:
        """The summed score of ``model`` over the held-out batches (see :func:`batch_score`)."""
        total, self.count = 0.0, 0
        with torch.no_grad(), evaluating(model):
            for (inputs, _), ref in zip(batches(self.watch, name="early-stop data"),
                                        self.targets):
                raw = call_model(model, move_to(inputs, self.ctx.device))
                score, count = batch_score(ref, _target(raw, inputs, self.hidden), inputs,
                                           self.hidden)
                total, self.count = total + score, self.count + count
        return total

    def check(self, model: nn.Module, step: int, *, eligible: bool = True) -> bool:
        """Measure at ``step``; True when the loop should stop. ``eligible=False`` (a pruning
        ramp still moving) measures without keeping the weights or counting patience."""
        count = self.score(model)
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
        n = self.count
        key = "best_cosine" if self.hidden else "best_agreement"
        return {"best_step": self.best_step, "checks": len(self.history),
                key: round(self.best / n, 6) if n and self.best >= 0 else None,
                "held_out": n}
