"""Label-preserving recovery: fewer prediction flips, not just the same accuracy.

The loss has three terms (see :func:`netpress.recover.losses.label_preserving_loss`):
cross-entropy on the reference's own predictions, distillation, and a hinge on the
reference's top-1 margin. With ``weights="auto"`` the term weights are chosen among a few
candidates by a short trial run of each on most of the train data, counting mismatches with
the reference on a held-out slice of it; the winner then runs the full recovery.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from netpress.config import check_fraction
from netpress.context import Context
from netpress.data import Data, split_batches
from netpress.errors import RecipeError
from netpress.measure.collect import collect_many
from netpress.recover.loop import TrainConfig, train
from netpress.recover.losses import label_preserving_loss
from netpress.registry import register

__all__ = ["LabelPreserve", "DEFAULT_CANDIDATES"]

WEIGHT_KEYS = ("ce", "kd", "margin")
#: (ce, kd, margin) weight triples tried by ``weights="auto"``.
DEFAULT_CANDIDATES: tuple[tuple[float, float, float], ...] = (
    (0.0, 1.0, 0.0), (1.0, 1.0, 0.0), (1.0, 1.0, 1.0), (0.5, 1.0, 4.0))


@dataclass(frozen=True, kw_only=True)
class LabelPreserve(TrainConfig):
    """Label-preserving recovery: CE on the reference's labels + distillation + a top-1
    margin hinge, with term weights tuned on held-out train batches to minimise mismatches."""

    weights: str | Mapping[str, float] = "auto"
    candidates: tuple[tuple[float, float, float], ...] = DEFAULT_CANDIDATES
    trial_fraction: float = 0.25
    temperature: float = 4.0
    margin: float = 1.0

    def __post_init__(self) -> None:
        self._check_train()
        n = self.type_name()
        if isinstance(self.weights, str):
            if self.weights != "auto":
                raise RecipeError(f"{n}: weights={self.weights!r}; use 'auto' or a mapping "
                                  f"with keys {WEIGHT_KEYS}")
        else:
            unknown = sorted(set(self.weights) - set(WEIGHT_KEYS))
            if unknown:
                raise RecipeError(f"{n}: unknown weight key(s) {unknown}; known: {WEIGHT_KEYS}")
        if not self.candidates or any(len(c) != 3 for c in self.candidates):
            raise RecipeError(f"{n}: candidates must be (ce, kd, margin) triples")
        check_fraction(n, "trial_fraction", self.trial_fraction, hi_open=False)
        if self.temperature <= 0 or self.margin < 0:
            raise RecipeError(f"{n}: temperature must be > 0 and margin >= 0")

    def fixed_weights(self) -> dict[str, float] | None:
        if isinstance(self.weights, str):
            return None
        return {k: float(self.weights.get(k, 0.0)) for k in WEIGHT_KEYS}


def _loss_fn(cfg: LabelPreserve, w: Mapping[str, float]) -> Any:
    def loss(out: torch.Tensor, teacher: torch.Tensor | None,
             _labels: torch.Tensor | None) -> torch.Tensor:
        assert teacher is not None
        return label_preserving_loss(out, teacher, ce_weight=w["ce"], kd_weight=w["kd"],
                                     margin_weight=w["margin"], temperature=cfg.temperature,
                                     margin=cfg.margin)

    return loss


def _mismatches(model: nn.Module, ctx: Context, data: Data) -> int:
    (ref, cmp), _, _ = collect_many([ctx.reference, model], data, device=ctx.device)
    return int((ref.argmax(-1) != cmp.argmax(-1)).sum())


def _tune(model: nn.Module, cfg: LabelPreserve, ctx: Context) -> tuple[dict[str, float],
                                                                         list[dict[str, Any]]]:
    train_split, held_out = split_batches(ctx.require("train", cfg.type_name()),
                                          cfg.validation_fraction)
    total = cfg.max_steps or None
    trial_cfg = _trial_config(cfg, total)
    trials: list[dict[str, Any]] = []
    for ce, kd, margin in cfg.candidates:
        w = {"ce": ce, "kd": kd, "margin": margin}
        trial_model = copy.deepcopy(model)
        trial_ctx = ctx.fork(train=train_split, progress=False)
        train(trial_model, trial_ctx, trial_cfg, _loss_fn(cfg, w), needs_teacher=True)
        trials.append({**w, "mismatches": _mismatches(trial_model, trial_ctx, held_out)})
    best = min(trials, key=lambda t: (t["mismatches"], -t["kd"]))
    return {k: best[k] for k in WEIGHT_KEYS}, trials


def _trial_config(cfg: LabelPreserve, total: int | None) -> TrainConfig:
    fields = cfg.without_early_stop()
    if total is not None:
        return TrainConfig(**{**fields, "max_steps": max(1, int(total * cfg.trial_fraction))})
    return TrainConfig(**{**fields, "epochs": cfg.epochs * cfg.trial_fraction})


@register(LabelPreserve, kind="recover", needs=("train",))
def _apply_label_preserve(model: nn.Module, cfg: LabelPreserve, ctx: Context) -> nn.Module:
    weights = cfg.fixed_weights()
    trials: list[dict[str, Any]] = []
    if weights is None:
        weights, trials = _tune(model, cfg, ctx)
    summary = train(model, ctx, cfg, _loss_fn(cfg, weights), needs_teacher=True)
    ctx.record(cfg.type_name(), weights=weights, trials=trials, **summary)
    return model

