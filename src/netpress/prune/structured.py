"""Structured pruning that physically removes channels, neurons, conv groups and heads.

``StructuredPrune`` traces the model on ``example_inputs`` (:mod:`netpress.graph`), scores
every removable unit (:mod:`.importance`), decides how many units each group keeps to meet a
MACs or parameter target (:mod:`.policy`), and cuts the kept slices into smaller tensors
(:mod:`.surgery`). The pruned model is replayed and checked before it is returned; if
anything does not fit, :class:`~netpress.errors.ModelError` is raised and the model given
to the step is left as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from netpress._inputs import Inputs
from netpress.config import MethodConfig
from netpress.context import Context
from netpress.errors import ModelError, RecipeError
from netpress.graph import ChannelGraph, analyze
from netpress.measure.macs import count_macs
from netpress.prune import _saliency
from netpress.reconstruct import structured as _refit
from netpress.prune._attention import split_attention
from netpress.prune.bn_recalibrate import recalibrate_batchnorm
from netpress.prune.importance import CRITERIA, DATA_CRITERIA
from netpress.prune.latency_target import RUNTIMES, LatencyRatio, search_latency
from netpress.prune.policy import ALLOCATIONS, GroupPlan, keep_floor, solve
from netpress.prune.surgery import SurgeryResult, remove_units, verify_pruned
from netpress.registry import register
from netpress.select import select_names

__all__ = ["StructuredPrune", "prune_structured", "ON_UNSUPPORTED"]

ON_UNSUPPORTED = ("error", "exclude")


@dataclass(frozen=True, kw_only=True)
class StructuredPrune(MethodConfig):
    """Remove whole channels, neurons, conv groups and attention heads to a MACs/params target.

    ``macs`` / ``params`` / ``latency``: the fraction of the *reference* model's MACs,
    parameters or measured latency to keep (set one). A latency target is measured on
    ``latency_runtime`` (``eager`` PyTorch or ``onnxruntime``) at ``latency_batch`` with
    ``latency_threads`` threads; the MACs fraction that meets it is searched for
    (:mod:`netpress.prune.latency_target`).
    ``importance``: l1, l2, bn_scale, taylor or hessian (the last two use the
    ``calibration`` data, else ``train``). ``allocation``: ``uniform`` (every group the same
    fraction) or ``global`` (one threshold over group-normalised scores). ``floor``: minimum
    fraction of units a group keeps; ``round_to``: kept channel counts are multiples of it.
    ``protect``: module names or ``re:`` patterns that keep all their channels.
    ``on_unsupported``: ``error`` (name the op and module) or ``exclude`` (leave the
    channels that op touches, with a warning). ``iterative_steps``: reach the target in that
    many prune-rescore rounds.
    ``reconstruct``: with ``calibration`` data, refit by least squares every layer that reads
    removed channels so its outputs match the unpruned model's
    (:mod:`netpress.reconstruct.structured`).
    """

    macs: float | None = None
    params: float | None = None
    latency: float | None = None
    latency_runtime: str = "eager"
    latency_batch: int = 1
    latency_threads: int = 1
    importance: str = "l2"
    allocation: str = "uniform"
    floor: float = 0.1
    round_to: int = 8
    protect: tuple[str, ...] = ()
    on_unsupported: str = "error"
    iterative_steps: int = 1
    calibration_batches: int = 4
    recalibrate_bn: int = 8
    hessian_samples: int = 4
    fp16: bool = False
    reconstruct: bool = True

    def __post_init__(self) -> None:
        name = self.type_name()
        targets = [(k, v) for k, v in (("macs", self.macs), ("params", self.params),
                                        ("latency", self.latency)) if v is not None]
        if len(targets) != 1:
            raise RecipeError(f"{name}: set exactly one target, macs=, params= or latency= (a "
                              f"fraction of the reference model to keep)")
        key, value = targets[0]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise RecipeError(f"{name}: {key}={value!r} must be a fraction in (0, 1]")
        _choice(name, "importance", self.importance, CRITERIA)
        _choice(name, "allocation", self.allocation, ALLOCATIONS)
        _choice(name, "on_unsupported", self.on_unsupported, ON_UNSUPPORTED)
        _choice(name, "latency_runtime", self.latency_runtime, RUNTIMES)
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) \
                or not 0 <= self.floor <= 1:
            raise RecipeError(f"{name}: floor={self.floor!r} must be in [0, 1]")
        if isinstance(self.recalibrate_bn, bool) or not isinstance(self.recalibrate_bn, int) \
                or self.recalibrate_bn < 0:
            raise RecipeError(f"{name}: recalibrate_bn={self.recalibrate_bn!r} must be a "
                              f"number of batches >= 0")
        for field_name in ("round_to", "iterative_steps", "calibration_batches",
                           "hessian_samples", "latency_batch", "latency_threads"):
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RecipeError(f"{name}: {field_name}={v!r} must be an int >= 1")
        if isinstance(self.protect, str) or not all(isinstance(p, str) for p in self.protect):
            raise RecipeError(f"{name}: protect must be a list of module names or 're:' "
                              f"patterns")
        for flag in ("fp16", "reconstruct"):
            if not isinstance(getattr(self, flag), bool):
                raise RecipeError(f"{name}: {flag} must be true or false")


def _choice(owner: str, field_name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise RecipeError(f"{owner}: {field_name}={value!r}; choose one of {options}")


def _check_unsupported(graph: ChannelGraph, cfg: StructuredPrune) -> None:
    if not graph.unsupported:
        return
    listed = "; ".join(f"{u.where} ({u.units} unit(s))" for u in graph.unsupported[:8])
    if cfg.on_unsupported == "error":
        raise ModelError(f"StructuredPrune: netpress cannot map how these ops use channels: "
                         f"{listed}. The model was not changed. Protect the module "
                         f"(protect=[...]) or pass on_unsupported='exclude' to leave those "
                         f"channels in place")
    warnings.warn(f"StructuredPrune: leaving the channels of unsupported ops in place: "
                  f"{listed}", stacklevel=3)


def _plans(graph: ChannelGraph, scores: list[np.ndarray], cfg: StructuredPrune) -> list[GroupPlan]:
    plans = []
    for g, s in zip(graph.groups, scores):
        minimum, multiple = keep_floor(len(g), cfg.floor, g.width, cfg.round_to)
        plans.append(GroupPlan(len(g), minimum, multiple, s))
    return plans


def _pruned_mask(graph: ChannelGraph, scores: list[np.ndarray], kept: list[int]) -> np.ndarray:
    mask = np.zeros(graph.blocked.size, dtype=bool)
    for g, s, k in zip(graph.groups, scores, kept):
        drop = len(g) - k
        if drop > 0:
            order = np.argsort(s, kind="stable")
            mask[g.units[order[:drop]]] = True
    return mask


def _one_round(model: nn.Module, cfg: StructuredPrune, x: Inputs, target: float,
               measured_now: float, ctx: Context | None) -> tuple[SurgeryResult, dict[str, Any]]:
    graph = analyze(model, x, protect=cfg.protect,
                    exclude_unsupported=cfg.on_unsupported == "exclude")
    _check_unsupported(graph, cfg)
    if not graph.groups:
        raise ModelError("StructuredPrune: the model has no channel that can be removed "
                         "(every channel is fixed by inputs, outputs, normalisation or "
                         "protection)")
    scores = _saliency.group_scores(model, graph, cfg, ctx)
    plans = _plans(graph, scores, cfg)
    none = np.zeros(graph.blocked.size, dtype=bool)
    estimate = graph.macs if cfg.macs is not None else graph.params
    base = max(1, estimate(none))

    def cost(kept: list[int]) -> float:
        return measured_now * estimate(_pruned_mask(graph, scores, kept)) / base

    try:
        kept = solve(plans, cfg.allocation, cost, target)
    except ValueError as exc:
        raise RecipeError(f"StructuredPrune: {exc} ({'MACs' if cfg.macs else 'parameters'}); "
                          f"lower floor or raise the target") from None
    pruned = _pruned_mask(graph, scores, kept)
    result = remove_units(model, graph, pruned)
    verify_pruned(model, graph, pruned, x)
    groups = {g.name: [len(g), k] for g, k in zip(graph.groups, kept) if k < len(g)}
    return result, {"groups": groups, "unsupported": [u.where for u in graph.unsupported]}


def _measure(model: nn.Module, x: Inputs, kind: str) -> int:
    if kind == "macs":
        return count_macs(model, x)
    return sum(p.numel() for p in model.parameters())


def prune_structured(model: nn.Module, cfg: StructuredPrune, example_inputs: Inputs, *,
                     reference: nn.Module | None = None, ctx: Context | None = None,
                     inplace: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Prune a copy of ``model`` (``model`` itself with ``inplace=True``); returns it and a
    summary. Without ``inplace`` ``model`` is never changed.

    Targets are fractions of ``reference`` (default: ``model``).
    """
    if cfg.latency is not None:
        return _prune_to_latency(model, cfg, example_inputs, reference=reference, ctx=ctx)
    kind = "macs" if cfg.macs is not None else "params"
    fraction = float(cfg.macs if cfg.macs is not None else cfg.params)  # type: ignore[arg-type]
    work = model if inplace else copy.deepcopy(model)  # every change happens on ``work``
    split = split_attention(work, example_inputs)  # MHA -> separate projections (heads)
    before = _measure(work, example_inputs, kind)
    goal = fraction * (before if reference is None else
                       _measure(reference, example_inputs, kind))
    started = time.perf_counter()
    summary: dict[str, Any] = {"groups": {}, "attributes": {}, "kept": {},
                               "split_attention": split}
    now = float(before)
    for step in range(cfg.iterative_steps):
        target = now * (goal / now) ** (1 / (cfg.iterative_steps - step)) if now > goal else now
        for _ in range(4):  # the graph's estimate vs the measured count: tighten if over
            if now <= target * (1 + 1e-9):
                break
            result, info = _one_round(work, cfg, example_inputs, target, now, ctx)
            now = float(_measure(work, example_inputs, kind))
            summary["groups"].update(info["groups"])
            summary["attributes"].update(result.attributes)
            for name, dims in result.kept.items():
                summary["kept"].setdefault(name, []).append(dims)
    seconds = round(time.perf_counter() - started, 4)
    summary.update({f"{kind}_before": before, f"{kind}_after": int(now),
                    f"{kind}_target": int(goal), "seconds": seconds})
    if kind == "macs":
        summary["params_after"] = sum(p.numel() for p in work.parameters())
    return work, summary


def _same_shapes(a: nn.Module, b: nn.Module | None) -> bool:
    """Whether ``b`` is absent or has exactly ``a``'s parameter names and shapes (so one
    timing serves both; timing the same architecture twice only adds noise)."""
    if b is None or b is a:
        return True
    sa = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    return sa == {k: tuple(v.shape) for k, v in b.state_dict().items()}


def _prune_to_latency(model: nn.Module, cfg: StructuredPrune, example_inputs: Inputs, *,
                      reference: nn.Module | None,
                      ctx: Context | None) -> tuple[nn.Module, dict[str, Any]]:
    ref = model if reference is None else reference
    ratio_of = LatencyRatio(ref, example_inputs, runtime=cfg.latency_runtime,
                            batch_size=cfg.latency_batch, threads=cfg.latency_threads)
    try:
        now = 1.0 if _same_shapes(model, reference) else ratio_of(model)
        if now <= float(cfg.latency):  # type: ignore[arg-type]
            # already fast enough (pruned earlier in the recipe): nothing to remove
            return copy.deepcopy(model), {"groups": {}, "attributes": {}, "kept": {},
                                          "latency_target": cfg.latency,
                                          "latency_ratio": round(now, 4)}
        macs_cfg = dataclasses.replace(cfg, latency=None, macs=1.0)

        def prune_to(fraction: float) -> tuple[nn.Module, dict[str, Any]]:
            return prune_structured(model, dataclasses.replace(macs_cfg, macs=fraction),
                                    example_inputs, ctx=ctx)

        return search_latency(prune_to, ratio_of, float(cfg.latency),  # type: ignore[arg-type]
                              start_ratio=now)
    finally:
        ratio_of.close()


def _slice_masks(ctx: Context, kept: dict[str, list[dict[int, torch.Tensor]]]) -> None:
    """Cut unstructured-pruning masks of pruned parameters to their new shapes."""
    for name, rounds in kept.items():
        mask = ctx.masks.get(name)
        if mask is None:
            continue
        for dims in rounds:
            for d, idx in sorted(dims.items()):
                mask = mask.index_select(d, idx.to(mask.device))
        ctx.masks[name] = mask


@register(StructuredPrune, kind="prune", needs=("example_inputs",))
def _apply(model: nn.Module, cfg: StructuredPrune, ctx: Context) -> nn.Module:
    x = ctx.require("example_inputs", by=cfg.type_name())
    if cfg.protect:
        select_names([n for n, _ in model.named_modules() if n], cfg.protect,
                     owner=cfg.type_name(), what="module")
    if cfg.importance in DATA_CRITERIA and ctx.calibration is None and ctx.train is None:
        ctx.require("calibration", by=f"{cfg.type_name()}(importance={cfg.importance!r})")
    refit = cfg.reconstruct and ctx.calibration is not None
    original = _refit.original_of(model, ctx.reference) if refit else None
    # compress() hands every step its own working copy and drops it if a step fails, so
    # pruning it in place saves a full model copy (BERT-base: 418 MB) at no risk.
    pruned, summary = prune_structured(model, cfg, x, reference=ctx.reference, ctx=ctx,
                                       inplace=True)
    if original is not None and summary["groups"]:
        summary["reconstruct"] = _refit.refit_after_pruning(pruned, original, summary, ctx, x)
    data = ctx.calibration if ctx.calibration is not None else ctx.train
    if data is not None and cfg.recalibrate_bn and summary["groups"] \
            and "reconstruct" not in summary:
        summary["bn_recalibrated_batches"] = recalibrate_batchnorm(pruned, data,
                                                                   limit=cfg.recalibrate_bn)
    _slice_masks(ctx, summary.pop("kept"))
    ctx.record(cfg.type_name(), **summary)
    return pruned
