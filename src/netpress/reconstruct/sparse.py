"""``SparseGPT`` and ``Wanda``: one-shot pruning fitted on calibration data.

``SparseGPT(sparsity=0.7)`` prunes each selected layer with OBS weight updates so its outputs
on the calibration inputs move least (in the default sequential mode: so they stay what the
*original* model's layer produced, given the inputs the compressed model now feeds it).
``Wanda`` prunes by ``|w| · ‖x‖`` without any update, the cheap baseline; with
``score="magnitude"`` it needs no data at all (magnitude pruning with the same patterns).
Per-layer sparsities are ``uniform`` or come from the ``global`` magnitude allocation with
its per-layer floor (as :class:`~netpress.GlobalMagnitudePrune`), from OWL's outlier ratios
(``owl``) or from each weight's measured OBS cost relative to its layer's output energy on
the calibration data (``sensitivity``: at most ``max_shift`` from the target per layer);
``per_layer`` pins some layers' sparsities (names or ``re:`` patterns) and the other layers
share what the total ``sparsity`` leaves.
``pattern="2:4"`` (or any ``"N:M"``) keeps N of every M consecutive input weights; layers
whose input size is not a multiple of M are left dense and listed in the report. Masks go to
the context, so a recovery step after keeps the zeros.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from netpress._cow import assign_, own_
from netpress.config import check_fraction
from netpress.context import Context
from netpress.errors import RecipeError
from netpress.prune.masks import floor_keep, global_prune_counts
from netpress.reconstruct._common import (
    LayerwiseSettings,
    calibrate,
    fitted_to,
    fitting_reference,
    warn_tied,
)
from netpress.reconstruct._measure import measured, trim_heap
from netpress.reconstruct.allocation import outlier_ratio, owl_sparsities
from netpress.reconstruct.engine import LayerStats, collect_statistics
from netpress.reconstruct.layers import LayerView
from netpress.reconstruct.lstsq import (
    corrected_bias,
    masked_lstsq,
    refit_from_residual,
    refit_target,
    refit_with_lower,
    with_bias,
)
from netpress.reconstruct.norms import norm_names, refit_layer_norms, segments
from netpress.reconstruct.obs import Handover, damped_lower_, inverse_upper_
from netpress.reconstruct.patterns import PackedMask, pack_mask, parse_pattern, unpack_mask
from netpress.reconstruct.refine import admm_prune
from netpress.reconstruct.sensitivity import relative_saliency, sensitivity_counts
from netpress.reconstruct.sparsegpt import sparsegpt, wanda_mask, wanda_scores
from netpress.registry import register
from netpress.select import resolve_per_layer

__all__ = ["SparseGPT", "Wanda", "ALLOCATIONS", "MASK_REFINES"]

ALLOCATIONS = ("uniform", "global", "owl", "sensitivity")
MASK_REFINES = ("none", "admm")


@dataclass(frozen=True, kw_only=True)
class _SparseSettings(LayerwiseSettings):
    sparsity: float = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    floor: float = 0.02
    min_weights: int = 0
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    max_shift: float = 0.2
    per_layer: Mapping[str, float] = field(default_factory=dict)

    def _check_sparse(self) -> None:
        name = self.type_name()
        self._check_layerwise()
        check_fraction(name, "sparsity", self.sparsity)
        check_fraction(name, "floor", self.floor, hi_open=False)
        try:
            parse_pattern(self.pattern)
        except ValueError as exc:
            raise RecipeError(f"{name}: {exc}") from None
        if self.allocation not in ALLOCATIONS:
            raise RecipeError(f"{name}: allocation={self.allocation!r}; choose one of "
                              f"{ALLOCATIONS}")
        if not isinstance(self.min_weights, int) or self.min_weights < 0:
            raise RecipeError(f"{name}: min_weights must be an int >= 0")
        check_fraction(name, "max_shift", self.max_shift, hi_open=False)
        for key, value in self.per_layer.items():
            check_fraction(name, f"per_layer[{key!r}]", value)
        if self.per_layer and (self.allocation != "uniform" or self.n_m is not None):
            raise RecipeError(f"{name}: per_layer sparsities need allocation='uniform' and "
                              "pattern='unstructured'")
        for key, lo in (("owl_m", 1.0), ("owl_lambda", 0.0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v < 1e6:
                raise RecipeError(f"{name}: {key}={v!r} must be a number >= {lo}")

    def _pinned(self, sizes: dict[str, int]) -> dict[str, float]:
        """``per_layer`` sparsities where given; every other layer the same sparsity, chosen
        so the total over all layers stays ``sparsity``."""
        pins = resolve_per_layer(list(sizes), self.per_layer, -1.0, owner=self.type_name())
        free = sum(n for k, n in sizes.items() if pins[k] < 0)
        pinned = sum(pins[k] * n for k, n in sizes.items() if pins[k] >= 0)
        rest = (self.sparsity * sum(sizes.values()) - pinned) / free if free else 0.0
        if free and not 0.0 <= rest < 1.0:
            raise RecipeError(f"{self.type_name()}: the per_layer sparsities leave "
                              f"{rest:.3f} for the other layers to reach {self.sparsity} in "
                              "total; change them or the sparsity")
        return {k: (pins[k] if pins[k] >= 0 else rest) for k in sizes}

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    def targets(self, layers: dict[str, nn.Module], sq_norms: dict[str, torch.Tensor] | None = None,
                hessians: dict[str, torch.Tensor] | None = None,
                ) -> tuple[dict[str, float], dict[str, str]]:
        """Sparsity per layer, and the layers left dense with the reason (``owl`` needs the
        layers' input ``sq_norms`` from the original model, ``sensitivity`` their input
        ``hessians``)."""
        views = {n: LayerView(m, n) for n, m in layers.items()}
        skipped: dict[str, str] = {}
        if self.n_m is not None:
            m = self.n_m[1]
            skipped = {n: f"{v.shape[2]} inputs per output is not a multiple of {m}"
                       for n, v in views.items() if v.shape[2] % m}
            if len(skipped) == len(views):
                raise RecipeError(f"{self.type_name()}: no selected layer has an input size "
                                  f"that is a multiple of {m} (pattern {self.pattern!r})")
            return {n: 1 - self.n_m[0] / m for n in views if n not in skipped}, skipped
        if self.allocation == "uniform":
            return self._pinned({n: v.weight.numel() for n, v in views.items()}), skipped
        if self.allocation == "sensitivity":
            assert hessians is not None
            scores = [torch.cat([relative_saliency(v.matrix()[g], hessians[n][g], self.damp)
                                 .flatten() for g in range(v.shape[0])])
                      for n, v in views.items()]
            try:
                counts = sensitivity_counts(scores, self.sparsity, self.max_shift)
            except ValueError as exc:
                raise RecipeError(f"{self.type_name()}: {exc}; raise max_shift") from None
            return {n: k / s.numel() for n, k, s in zip(views, counts, scores)}, skipped
        if self.allocation == "owl":
            assert sq_norms is not None
            ratios = [outlier_ratio(wanda_scores_grouped(v.matrix(), sq_norms[n]), self.owl_m)
                      for n, v in views.items()]
            sizes = [v.weight.numel() for v in views.values()]
            return dict(zip(views, owl_sparsities(ratios, sizes, self.sparsity,
                                                  self.owl_lambda))), skipped
        weights = [v.weight.detach() for v in views.values()]
        floors = [floor_keep(w.numel(), self.floor, self.min_weights) for w in weights]
        try:
            counts = global_prune_counts([w.abs() for w in weights], self.sparsity, floors)
        except ValueError as exc:
            raise RecipeError(f"{self.type_name()}: {exc}; lower the sparsity or the "
                              "floor") from None
        return {n: k / w.numel() for n, k, w in zip(views, counts, weights)}, skipped


@dataclass(frozen=True, kw_only=True)
class SparseGPT(_SparseSettings):
    """One-shot pruning with OBS weight updates fitted on calibration data (SparseGPT).

    ``refit=True`` re-solves the kept weights of each row exactly by least squares after the
    mask is chosen (slower; helps at high sparsity). ``refit_bias=True`` also refits the
    bias of layers that have one: jointly with the kept weights under ``refit``, else so the
    layer's mean output on the calibration data stays the original's. ``refit_norms=True``
    re-fits every LayerNorm's affine parameters to the original model's outputs, each after
    the layers before it are pruned and before those after it are (one calibration pass per
    segment between norms: slower; :mod:`netpress.reconstruct.norms`).
    ``mask_refine="admm"`` revisits SparseGPT's mask of each layer by ALPS-style ADMM
    (the same number of kept weights, now chosen over the whole layer) and refits the kept
    weights by least squares (implies ``refit``; unstructured only; slower:
    :mod:`netpress.reconstruct.refine`).
    """

    refit: bool = False
    refit_bias: bool = False
    refit_norms: bool = False
    mask_refine: str = "none"

    def __post_init__(self) -> None:
        self._check_sparse()
        for key in ("refit", "refit_bias", "refit_norms"):
            if not isinstance(getattr(self, key), bool):
                raise RecipeError(f"SparseGPT: {key}={getattr(self, key)!r} must be true or "
                                  "false")
        if self.mask_refine not in MASK_REFINES:
            raise RecipeError(f"SparseGPT: mask_refine={self.mask_refine!r}; choose one of "
                              f"{MASK_REFINES}")
        if self.mask_refine != "none" and self.n_m is not None:
            raise RecipeError(f"SparseGPT: mask_refine={self.mask_refine!r} needs "
                              f"pattern='unstructured', not {self.pattern!r}")


@dataclass(frozen=True, kw_only=True)
class Wanda(_SparseSettings):
    """One-shot pruning by ``|weight| · ‖input‖`` per output row, without updates (Wanda);
    ``score="magnitude"`` drops the input norms (and the need for data)."""

    score: str = "wanda"

    def __post_init__(self) -> None:
        self._check_sparse()
        if self.score not in ("wanda", "magnitude"):
            raise RecipeError(f"Wanda: score={self.score!r}; choose 'wanda' or 'magnitude'")


def _blocksize(cfg: _SparseSettings) -> int:
    m = cfg.n_m[1] if cfg.n_m is not None else 1
    return max(m, cfg.blocksize // m * m)


def _sparsegpt_solver(cfg: SparseGPT, targets: dict[str, float],
                      masks: dict[str, PackedMask]) -> Any:
    def solve(name: str, view: LayerView, stats: LayerStats) -> None:
        assert stats.hessian is not None
        refit = cfg.refit or cfg.mask_refine != "none"
        # the statistics' last use is here: hand the cross term to the refit and the Hessian
        # to the sweep (one d x d float64 matrix fewer at each; the same result)
        consume = stats.owned and view.shape[0] == 1 and not cfg.refit_bias
        if consume and not refit:  # the whole fit in the Hessian's own storage
            pruned, keep = _fit_consuming(view, stats, targets[name], cfg)
            view.set_matrix(pruned[None])
            del pruned
            masks[f"{name}.weight"] = pack_mask(view.weight_layout(keep[None]))
            return
        w = view.matrix()
        keeps = []
        for g in range(w.shape[0]):
            assert stats.hessian is not None  # handed over only in the last (sole) group
            if stats.residual is not None:
                target = refit_from_residual(w[g], stats.hessian[g], stats.residual[g],
                                             cfg.damp)
            elif stats.cross is None:
                target = w[g]
            elif consume:
                cross, stats.cross = Handover(stats.cross[0]), None
                target = refit_target(w[0], stats.hessian[0], cross, cfg.damp)
            else:
                target = refit_target(w[g], stats.hessian[g], stats.cross[g], cfg.damp)
            if g == w.shape[0] - 1 and not cfg.refit_bias:
                stats.cross = stats.residual = None  # not needed any more: free it first
            h: torch.Tensor | Handover = stats.hessian[g]
            if consume and not refit:
                h, stats.hessian = Handover(stats.hessian[0]), None
            pruned, keep = sparsegpt(target, h, sparsity=targets[name], n_m=cfg.n_m,
                                     blocksize=_blocksize(cfg), damp=cfg.damp)
            del h
            if refit:
                hessian = stats.hessian
                assert hessian is not None
                if cfg.mask_refine == "admm":
                    keep = admm_prune(target, hessian[g], pruned, keep=int(keep.sum()),
                                      damp=cfg.damp)
                pruned = masked_lstsq(target, hessian[g], keep, cfg.damp)
            w[g] = pruned
            keeps.append(keep)
        if cfg.refit_bias:
            _refit_bias(view, stats, w, torch.stack(keeps), cfg)
        view.set_matrix(w)
        masks[f"{name}.weight"] = pack_mask(view.weight_layout(torch.stack(keeps)))
    return solve


def _fit_consuming(view: LayerView, stats: LayerStats, sparsity: float,
                   cfg: SparseGPT) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT of a one-group layer whose statistics are used here for the last time: the
    damped Hessian is factored in its own storage, the factor serves the refit to the
    original outputs (from the residual statistic, or the cross term consumed as
    ``M - H``) and is then turned into the sweep's inverse factor in the same storage: one
    d x d float64 matrix for the whole fit (75 MB for a 3072-wide layer), the same values
    as refitting and sweeping from the Hessian separately. The target is pruned in place."""
    assert stats.hessian is not None
    h = Handover(stats.hessian[0])
    stats.hessian = None
    weight = view.matrix()[0]
    residual_t: Handover | None = None
    if stats.residual is not None:
        residual_t, stats.residual = Handover(stats.residual[0].T), None
    elif stats.cross is not None:
        m, stats.cross = stats.cross[0], None
        residual_t = Handover(m.sub_(h.peek()).T @ weight.T)  # (M - H) in M's storage
        del m
    trim_heap()  # the statistics' temporaries, before the fit's own
    lower = damped_lower_(h, cfg.damp)
    if residual_t is not None:
        weight = refit_with_lower(weight, residual_t, lower)
    trim_heap()
    return sparsegpt(weight, None, sparsity=sparsity, n_m=cfg.n_m, blocksize=_blocksize(cfg),
                     damp=cfg.damp, u=inverse_upper_(lower), inplace=True)


def _refit_bias(view: LayerView, stats: LayerStats, w: torch.Tensor, keep: torch.Tensor,
                cfg: SparseGPT) -> None:
    """Refit the bias of ``view`` (and with ``cfg.refit`` the kept weights ``w``, in place)
    to the original layer's outputs; no-op for layers without a bias."""
    bias = getattr(view.module, "bias", None)
    if not isinstance(bias, torch.Tensor) or stats.mean is None or stats.hessian is None:
        return
    old, b = view.matrix(), bias.detach().double().reshape(w.shape[0], w.shape[1]).clone()
    for g in range(w.shape[0]):
        orig_mean = stats.orig_mean[g] if stats.orig_mean is not None else stats.mean[g]
        if cfg.refit or cfg.mask_refine != "none":
            h = stats.hessian[g]
            m = stats.cross[g] if stats.cross is not None else h
            h1, m1 = with_bias(h, m, stats.mean[g], orig_mean)
            target = refit_target(torch.cat([old[g], b[g][:, None]], 1), h1, m1, cfg.damp)
            full = masked_lstsq(target, h1, torch.cat([keep[g], keep.new_ones(
                keep.shape[1], 1)], 1), cfg.damp)
            w[g], b[g] = full[:, :-1], full[:, -1]
        else:
            b[g] = corrected_bias(old[g], w[g], b[g], stats.mean[g], orig_mean)
    with torch.no_grad():
        assign_(bias, b)


def _wanda_solver(cfg: Wanda, targets: dict[str, float],
                  masks: dict[str, PackedMask]) -> Any:
    def solve(name: str, view: LayerView, stats: LayerStats | None) -> None:
        w = view.matrix()
        norms = stats.sq_norms if stats is not None else torch.ones(w.shape[0], w.shape[2])
        keep = torch.stack([wanda_mask(w[g], norms[g], sparsity=targets[name], n_m=cfg.n_m)
                            for g in range(w.shape[0])])
        view.set_matrix(w.masked_fill(~keep, 0.0))
        masks[f"{name}.weight"] = pack_mask(view.weight_layout(keep))
    return solve


def _finish(model: nn.Module, cfg: _SparseSettings, ctx: Context,
            packed: dict[str, PackedMask], skipped: dict[str, str],
            info: dict[str, Any]) -> nn.Module:
    # the masks are held packed while the pass runs (an eighth of their bool size), and by
    # the projection afterwards (its own copy, unpacked a layer at a time when it runs)
    masks = {k: unpack_mask(v) for k, v in packed.items()}
    ctx.set_masks(model, masks)

    def project(m: nn.Module) -> dict[str, torch.Tensor]:
        fixed = {}
        with torch.no_grad():
            for key, bits in packed.items():
                keep = fixed[key] = unpack_mask(bits)
                own_(m.get_parameter(key)).masked_fill_(~keep, 0.0)
        return fixed

    ctx.add_projection(cfg.type_name(), project)
    total = sum(k.numel() for k in masks.values())
    kept = sum(int(k.sum()) for k in masks.values())
    per_layer = {k[: -len(".weight")]: round(1 - int(v.sum()) / v.numel(), 4)
                 for k, v in masks.items()}
    ctx.record(cfg.type_name(), sparsity=round(1 - kept / max(1, total), 6),
               pattern=cfg.pattern, allocation=cfg.allocation, mode=cfg.mode,
               layers=len(masks), per_layer_sparsity=per_layer, left_dense=skipped, **info)
    return model


def wanda_scores_grouped(matrix: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda scores of a ``(groups, rows, d)`` matrix view with per-group input norms."""
    return torch.stack([wanda_scores(matrix[g], sq_norms[g].to(matrix.dtype))
                        for g in range(matrix.shape[0])])


def _targets(cfg: _SparseSettings, ctx: Context, layers: dict[str, nn.Module],
             ) -> tuple[dict[str, float], dict[str, str]]:
    """Per-layer sparsities; OWL and sensitivity first measure the original model's input
    norms or Hessians (one forward over the calibration data)."""
    norms = hessians = None
    if cfg.allocation in ("owl", "sensitivity") and cfg.n_m is None:
        data = ctx.require("calibration", f"{cfg.type_name()}(allocation={cfg.allocation!r})")
        full = cfg.allocation == "sensitivity"
        stats = collect_statistics(ctx.reference, ctx.reference, list(layers), data,
                                   mode="plain", full=full,
                                   max_batches=cfg.calibration_batches)
        norms = {n: st.sq_norms for n, st in stats.items()}
        hessians = {n: st.hessian for n, st in stats.items() if st.hessian is not None}
    return cfg.targets(layers, norms, hessians)


def _needs(cfg: Wanda) -> tuple[str, ...]:
    return ("calibration",) if cfg.score == "wanda" or cfg.allocation in (
        "owl", "sensitivity") else ()


def _with_norms(model: nn.Module, cfg: SparseGPT, ctx: Context, names: list[str],
                solve: Any) -> dict[str, Any]:
    """Fit the layers segment by segment, re-fitting the LayerNorms between segments."""
    ref, data = ctx.reference, ctx.require("calibration", cfg.type_name())
    assert ref is not None
    info: dict[str, Any] = {"norms_refit": 0, "not_called": []}
    for layers, norms in segments(model, names, norm_names(model, ref)):
        if layers:
            part = calibrate(model, cfg, ctx, layers, solve, residual=not cfg.refit_bias)
            info["not_called"] += part["not_called"]
            info.setdefault("shrinkage", {}).update(part.get("shrinkage", {}))
            ratios = [r for r in (info.get("min_rows_per_column"),
                                  part.get("min_rows_per_column")) if r is not None]
            info["min_rows_per_column"] = min(ratios, default=None)
        info["norms_refit"] += len(refit_layer_norms(model, ref, data, names=norms,
                                                     max_batches=cfg.calibration_batches))
    return info


@register(SparseGPT, kind="prune", needs=("calibration",), copy_on_write=True)
def _apply_sparsegpt(model: nn.Module, cfg: SparseGPT, ctx: Context) -> nn.Module:
    layers = cfg.selected(model)
    masks: dict[str, PackedMask] = {}
    with fitting_reference(model, ctx, layers) as changed:
        targets, skipped = _targets(cfg, ctx, layers)
        with measured() as info:
            solve = _sparsegpt_solver(cfg, targets, masks)
            if not cfg.refit_norms:
                info.update(calibrate(model, cfg, ctx, list(targets), solve,
                                      residual=not cfg.refit_bias))
            else:
                info.update(_with_norms(model, cfg, ctx, list(targets), solve))
    info["fitted_to"] = fitted_to(changed)
    if tied := warn_tied(model, cfg.type_name(), targets):
        info["tied"] = tied
    return _finish(model, cfg, ctx, masks, skipped, info)


@register(Wanda, kind="prune", needs=_needs, copy_on_write=True)
def _apply_wanda(model: nn.Module, cfg: Wanda, ctx: Context) -> nn.Module:
    layers = cfg.selected(model)
    masks: dict[str, PackedMask] = {}
    with fitting_reference(model, ctx, layers) as changed:
        targets, skipped = _targets(cfg, ctx, layers)
        solve = _wanda_solver(cfg, targets, masks)
        with measured() as info:
            if cfg.score == "wanda":
                info.update(calibrate(model, cfg, ctx, list(targets), solve, full=False,
                                      fit_original=False))
            else:
                for name in targets:
                    solve(name, LayerView(layers[name], name), None)
    info["fitted_to"] = fitted_to(changed)
    if tied := warn_tied(model, cfg.type_name(), targets):
        info["tied"] = tied
    return _finish(model, cfg, ctx, masks, skipped, info)

