"""Unstructured pruning: layer-wise, and global with a per-layer floor.

Both methods zero individual weights of the selected Conv/Linear layers, ranked by
``importance`` (:func:`netpress.prune.importance.weight_scores`): ``magnitude`` (the default,
no data), ``taylor`` (loss preservation, ``|w * g|``) or ``grad_norm`` (gradient-norm
preservation, ``|w * Hg|``); the last two use ``calibration_batches`` of the calibration
data, else of the train data. Masks are kept in
the :class:`~netpress.context.Context` and re-applied after every recovery step, so pruned
weights stay zero; the final model holds real zeros and no hooks or ``weight_orig`` copies.
With ``schedule="cubic"`` the sparsity ramps up over the recovery that follows (Zhu & Gupta).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from netpress.config import MethodConfig, check_fraction
from netpress.context import Context, MaskFn, PruneSchedule
from netpress.errors import RecipeError
from netpress.prune.importance import WEIGHT_CRITERIA, weight_scores
from netpress.prune.masks import (
    floor_keep,
    global_prune_counts,
    magnitude_mask,
    prune_count,
    smallest_mask,
)
from netpress.registry import register
from netpress.select import check_patterns, resolve_per_layer, select_names, weighted_modules

__all__ = ["LayerwiseMagnitudePrune", "GlobalMagnitudePrune", "SCHEDULES"]

SCHEDULES = ("oneshot", "cubic")


@dataclass(frozen=True, kw_only=True)
class _PruneCommon(MethodConfig):
    layers: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = ()
    schedule: str = "oneshot"
    ramp_end: float = 0.7
    ramp_updates: int = 10
    importance: str = "magnitude"
    calibration_batches: int = 4

    def _check_common(self) -> None:
        name = self.type_name()
        if self.importance not in WEIGHT_CRITERIA:
            raise RecipeError(f"{name}: importance={self.importance!r}; choose one of "
                              f"{WEIGHT_CRITERIA}")
        if isinstance(self.calibration_batches, bool) or \
                not isinstance(self.calibration_batches, int) or self.calibration_batches < 1:
            raise RecipeError(f"{name}: calibration_batches={self.calibration_batches!r} must "
                              f"be an int >= 1")
        if self.schedule not in SCHEDULES:
            raise RecipeError(f"{name}: schedule={self.schedule!r}; choose one of {SCHEDULES}")
        check_fraction(name, "ramp_end", self.ramp_end, hi_open=False)
        if self.ramp_end == 0:
            raise RecipeError(f"{name}: ramp_end must be > 0")
        if not isinstance(self.ramp_updates, int) or self.ramp_updates < 1:
            raise RecipeError(f"{name}: ramp_updates={self.ramp_updates!r} must be an int >= 1")
        check_patterns(name, layers=self.layers, ignore=self.ignore)

    def selected(self, model: nn.Module) -> dict[str, nn.Module]:
        candidates = weighted_modules(model)
        names = select_names(list(candidates), self.layers, self.ignore, owner=self.type_name())
        return {n: candidates[n] for n in names}


class _Scorer:
    """Per-weight scores of the selected layers; data-driven ones are recomputed only when a
    weight changed since the last call (a cubic ramp asks once per update)."""

    def __init__(self, cfg: _PruneCommon, ctx: Context) -> None:
        self.cfg, self.ctx = cfg, ctx
        self._key: tuple[Any, ...] | None = None
        self._scores: list[torch.Tensor] = []

    def __call__(self, model: nn.Module, layers: dict[str, nn.Module]) -> list[torch.Tensor]:
        weights = [_weight(m) for m in layers.values()]
        if self.cfg.importance == "magnitude":
            return [weight_scores("magnitude", w) for w in weights]
        key = tuple((id(w), w._version) for w in weights)
        if key != self._key:
            from netpress.prune._saliency import derivatives

            derived = derivatives(model, weights, self.cfg.importance,  # type: ignore[arg-type]
                                  self.ctx, batches=self.cfg.calibration_batches,
                                  owner=self.cfg.type_name())
            self._scores = [weight_scores(self.cfg.importance, w, d)
                            for w, d in zip(weights, derived)]
            self._key = tuple((id(w), w._version) for w in weights)
        return self._scores


@dataclass(frozen=True, kw_only=True)
class LayerwiseMagnitudePrune(_PruneCommon):
    """Prune each selected layer by weight magnitude to its own sparsity.

    ``sparsity`` is the default; ``per_layer`` maps layer names or ``re:`` patterns to their
    own sparsity (exact names win, then the first matching pattern).
    """

    sparsity: float = 0.5
    per_layer: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_common()
        check_fraction(self.type_name(), "sparsity", self.sparsity)
        for key, value in self.per_layer.items():
            check_fraction(self.type_name(), f"per_layer[{key!r}]", value)


@dataclass(frozen=True, kw_only=True)
class GlobalMagnitudePrune(_PruneCommon):
    """One magnitude threshold across all selected layers, with a per-layer floor.

    Each layer keeps at least ``max(ceil(floor * n), min_weights)`` weights; layers that the
    global threshold would push below it are held at the floor and the remaining budget is
    redistributed, so the global ``sparsity`` is met exactly and no layer collapses.
    """

    sparsity: float = 0.8
    floor: float = 0.02
    min_weights: int = 0

    def __post_init__(self) -> None:
        self._check_common()
        check_fraction(self.type_name(), "sparsity", self.sparsity)
        check_fraction(self.type_name(), "floor", self.floor, hi_open=False)
        if not isinstance(self.min_weights, int) or self.min_weights < 0:
            raise RecipeError(f"{self.type_name()}: min_weights must be an int >= 0")


def _weight(module: nn.Module) -> torch.Tensor:
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w


def _layerwise_masks(cfg: LayerwiseMagnitudePrune, model: nn.Module, scale: float,
                     scorer: _Scorer) -> dict[str, torch.Tensor]:
    layers = cfg.selected(model)
    targets = resolve_per_layer(list(layers), cfg.per_layer, cfg.sparsity, owner=cfg.type_name())
    if cfg.importance == "magnitude":
        return {f"{n}.weight": magnitude_mask(_weight(layers[n]), targets[n] * scale)
                for n in layers}
    scores = scorer(model, layers)
    return {f"{n}.weight": smallest_mask(s, prune_count(s.numel(), targets[n] * scale))
            for n, s in zip(layers, scores)}


def _global_masks(cfg: GlobalMagnitudePrune, model: nn.Module, sparsity: float,
                  scorer: _Scorer) -> dict[str, torch.Tensor]:
    layers = cfg.selected(model)
    weights = [_weight(m).detach() for m in layers.values()]
    floors = [floor_keep(w.numel(), cfg.floor, cfg.min_weights) for w in weights]
    scores = scorer(model, layers)
    try:
        counts = global_prune_counts(scores, sparsity, floors)
    except ValueError as exc:
        raise RecipeError(f"{cfg.type_name()}: {exc}; lower the sparsity or the floor") from None
    return {f"{n}.weight": smallest_mask(s, k) for n, s, k in zip(layers, scores, counts)}


def _summary(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    per_layer = {k[: -len(".weight")]: round(1 - int(m.sum()) / m.numel(), 4)
                 for k, m in masks.items()}
    return {"sparsity": round(1 - kept / max(1, total), 6), "layers": len(masks),
            "per_layer_sparsity": per_layer}


def _apply(model: nn.Module, cfg: _PruneCommon, ctx: Context, masks_at: MaskFn) -> nn.Module:
    """Prune now (one-shot) or hand a cubic ramp to the recovery that follows."""

    def project(m: nn.Module) -> dict[str, torch.Tensor]:
        masks = masks_at(m, 1.0)
        with torch.no_grad():
            for name, keep in masks.items():
                m.get_parameter(name).masked_fill_(~keep, 0.0)
        return masks

    ctx.add_projection(cfg.type_name(), project)
    if cfg.schedule == "oneshot":
        masks = masks_at(model, 1.0)
        ctx.set_masks(model, masks)
        ctx.record(cfg.type_name(), schedule="oneshot", **_summary(model, masks))
    else:
        ctx.add_schedule(PruneSchedule(cfg.type_name(), masks_at, ramp_end=cfg.ramp_end,
                                       updates=cfg.ramp_updates))
        ctx.record(cfg.type_name(), schedule="cubic", layers=len(cfg.selected(model)))
    return model


@register(LayerwiseMagnitudePrune, kind="prune")
def _apply_layerwise(model: nn.Module, cfg: LayerwiseMagnitudePrune, ctx: Context) -> nn.Module:
    # A cubic ramp scales every layer's own target by the same fraction of the way.
    scorer = _Scorer(cfg, ctx)

    def masks_at(m: nn.Module, progress: float) -> dict[str, torch.Tensor]:
        return _layerwise_masks(cfg, m, progress, scorer)

    masks_at(model, 0.0)  # validate patterns before anything changes
    return _apply(model, cfg, ctx, masks_at)


@register(GlobalMagnitudePrune, kind="prune")
def _apply_global(model: nn.Module, cfg: GlobalMagnitudePrune, ctx: Context) -> nn.Module:
    scorer = _Scorer(cfg, ctx)

    def masks_at(m: nn.Module, progress: float) -> dict[str, torch.Tensor]:
        return _global_masks(cfg, m, cfg.sparsity * progress, scorer)

    masks_at(model, 1.0)  # validate patterns and feasibility before any change
    return _apply(model, cfg, ctx, masks_at)
