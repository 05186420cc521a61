"""Structured pruning that physically removes channels, neurons, conv groups and heads.

``StructuredPrune`` traces the model on ``example_inputs`` (:mod:`netpress.graph`), scores
every removable unit (:mod:`.importance`), decides how many units each group keeps to meet a
MACs or parameter target (:mod:`.policy`), and cuts the kept slices into smaller tensors
(:mod:`.surgery`). The pruned model is replayed and checked before it is returned.

Reaching the target: the allocation first uses the *exact* groups (removing a unit whose
weights are zero leaves the outputs unchanged), then relaxes ``round_to`` for groups too
narrow for it, then adds the inexact ones (the hidden size of a transformer, whose norms'
statistics count every channel; a global response norm's channels), then both; the first
stage that meets the target without falling more than three points under it is used, and a
relaxed rounding is reported. A group whose sizes the model's code cannot follow (a size it
also computes with, a comparison that would break) is left whole with a warning naming it,
and the target is reached with the rest. When the target is out of reach, the
:class:`~netpress.errors.RecipeError` gives the most that can be removed and the ops (with
their modules) that hold the rest, and the rules that fixed their channels. The model given
to the step is never changed.
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
from netpress.prune._allocate import (
    TOLERANCE,
    Round,
    Unreachable,
    allocate,
    round_info,
    unreachable,
    what_holds,
)
from netpress.prune._attention import split_attention
from netpress.prune._streams import residual_streams
from netpress.prune.bn_recalibrate import recalibrate_batchnorm
from netpress.prune.importance import CRITERIA, DATA_CRITERIA
from netpress.prune.latency_target import RUNTIMES, LatencyRatio, search_latency
from netpress.prune.policy import ALLOCATIONS
from netpress.prune.surgery import (
    PruneCheckError,
    SurgeryResult,
    plan_sizes,
    remove_units,
    undo,
    verify_pruned,
)
from netpress.reconstruct import structured as _refit
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
    ``importance``: l1, l2, bn_scale, taylor, hessian, grad_norm or obs (the last four use the
    ``calibration`` data, else ``train``). ``allocation``: ``uniform`` (every group the same
    fraction) or ``global`` (one threshold over group-normalised scores). ``floor``: minimum
    fraction of units a group keeps; ``round_to``: kept channel counts are multiples of it
    (relaxed, with a warning, for groups too narrow for it when the target needs it).
    ``protect``: module names or ``re:`` patterns that keep all their channels.
    ``keep_streams``: CNN residual streams (channel groups several convs write into, through
    identity shortcuts) keep all their channels, unless the target cannot be reached
    without cutting them (then they are cut, with a warning); measured better on ResNets
    (:mod:`netpress.prune._streams`). ``False`` prunes them like any group.
    ``on_unsupported``: ``error`` (name the op and module) or ``exclude`` (leave the
    channels that op touches, with a warning). ``iterative_steps``: reach the target in that
    many prune-rescore rounds.
    ``reconstruct``: with ``calibration`` data, refit by least squares every layer that reads
    removed channels so its outputs match the unpruned model's
    (:mod:`netpress.reconstruct.structured`); ``refit_scope``: ``all`` (every layer the
    refit handles, as downstream ones see drifted inputs too; measured best) or
    ``consumers`` (those layers only).
    BatchNorm statistics are re-estimated (``recalibrate_bn`` batches) only when no refit
    ran: after a refit it lowered agreement (BENCHMARKS.md, issue 11).
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
    keep_streams: bool = True
    on_unsupported: str = "error"
    iterative_steps: int = 1
    calibration_batches: int = 4
    recalibrate_bn: int = 8
    hessian_samples: int = 4
    fp16: bool = False
    reconstruct: bool = True
    refit_scope: str = "all"

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
        _choice(name, "refit_scope", self.refit_scope, _refit.SCOPES)
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
        for flag in ("fp16", "reconstruct", "keep_streams"):
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


def _one_round(model: nn.Module, cfg: StructuredPrune, x: Inputs, target: float,
               measured_now: float, reference: float, ctx: Context | None,
               excluded: dict[str, str]) -> tuple[SurgeryResult, dict[str, Any]]:
    graph = analyze(model, x, protect=cfg.protect,
                    exclude_unsupported=cfg.on_unsupported == "exclude")
    _check_unsupported(graph, cfg)
    none = np.zeros(graph.blocked.size, dtype=bool)
    estimate = graph.macs if cfg.macs is not None else graph.params
    r = Round(graph, [], cfg, measured_now, max(1, estimate(none)), reference)
    if not graph.groups:
        raise ModelError(f"StructuredPrune: the model has no channel that can be removed: "
                         f"every channel is fixed. What holds them: {what_holds(r, none)}")
    r.scores = _saliency.group_scores(model, graph, cfg, ctx)
    owner = {int(u): i for i, g in enumerate(graph.groups) for u in g.units}
    streams = set(residual_streams(model, graph)) if cfg.keep_streams else set()
    for _ in range(len(graph.groups) + 1):
        try:
            kept = _allocate_keeping(r, target, set(excluded), streams)
        except Unreachable as exc:
            raise unreachable(r, target, exc.most, excluded) from None
        pruned = r.mask(kept)
        try:
            result = _cut(model, graph, pruned, x)
        except PruneCheckError as exc:
            bad = _culprits(graph, owner, pruned, exc, set(excluded))
            if not bad:
                raise
            for name in bad:
                excluded[name] = str(exc)
            listed = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            warnings.warn(f"StructuredPrune: leaving {listed} whole: {exc}", stacklevel=4)
            continue
        return result, round_info(r, kept, excluded)
    raise ModelError("StructuredPrune: no group could be pruned safely")


def _allocate_keeping(r: Round, target: float, excluded: set[str],
                      streams: set[str]) -> list[int]:
    """Allocate with the residual ``streams`` whole; cut them too (warning) if that cannot
    reach the target."""
    if streams - excluded:
        try:
            return allocate(r, target, excluded | streams)[0]
        except Unreachable:
            warnings.warn(f"StructuredPrune: the target needs the residual stream(s) "
                          f"{', '.join(sorted(streams))[:200]} cut too (keep_streams)",
                          stacklevel=5)
            streams.clear()
    return allocate(r, target, excluded)[0]


def _culprits(graph: ChannelGraph, owner: dict[int, int], pruned: np.ndarray,
              exc: PruneCheckError, excluded: set[str]) -> list[str]:
    """The groups to leave whole after a failed check: those of the units involved, else the
    pruned groups of the module where it failed (and its submodules)."""
    bad = {graph.groups[owner[int(u)]].name for u in exc.labels if int(u) in owner}
    if not bad - excluded and exc.module is not None:
        prefix = exc.module + "."
        bad = {g.name for g in graph.groups if pruned[g.units].any()
               and any(m == exc.module or m.startswith(prefix) or not exc.module
                       for m in g.modules)}
    return sorted(bad - excluded)


def _cut(model: nn.Module, graph: ChannelGraph, pruned: np.ndarray, x: Inputs) -> SurgeryResult:
    """Surgery then the replay check; the model is restored when the check fails."""
    sizes = plan_sizes(graph, pruned)
    result = remove_units(model, graph, pruned, sizes)
    try:
        verify_pruned(model, graph, pruned, x)
    except PruneCheckError:
        undo(result)
        raise
    return result


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
    reference_measure = goal / fraction
    summary: dict[str, Any] = {"groups": {}, "attributes": {}, "kept": {},
                               "split_attention": split, "inexact_groups": [],
                               "round_to_relaxed": [], "excluded": {}}
    excluded: dict[str, str] = {}
    now = float(before)
    for step in range(cfg.iterative_steps):
        target = now * (goal / now) ** (1 / (cfg.iterative_steps - step)) if now > goal else now
        for _ in range(4):  # the graph's estimate vs the measured count: tighten if over
            if now <= target * (1 + 1e-9):
                break
            result, info = _one_round(work, cfg, example_inputs, target, now,
                                      reference_measure, ctx, excluded)
            now = float(_measure(work, example_inputs, kind))
            _merge(summary, info, result)
    _warn_overshoot(summary, cfg, kind, now, goal, reference_measure)
    seconds = round(time.perf_counter() - started, 4)
    summary.update({f"{kind}_before": before, f"{kind}_after": int(now),
                    f"{kind}_target": int(goal), "seconds": seconds})
    if kind == "macs":
        summary["params_after"] = sum(p.numel() for p in work.parameters())
    return work, summary


def _merge(summary: dict[str, Any], info: dict[str, Any], result: SurgeryResult) -> None:
    summary["groups"].update(info["groups"])
    summary["attributes"].update(result.attributes)
    summary["excluded"].update(info["excluded"])
    for key in ("inexact_groups", "round_to_relaxed"):
        summary[key].extend(n for n in info[key] if n not in summary[key])
    for name, dims in result.kept.items():
        summary["kept"].setdefault(name, []).append(dims)


def _warn_overshoot(summary: dict[str, Any], cfg: StructuredPrune, kind: str, now: float,
                    goal: float, reference: float) -> None:
    label = "MACs" if kind == "macs" else "parameters"
    if summary["round_to_relaxed"]:
        warnings.warn(f"StructuredPrune: round_to={cfg.round_to} relaxed for groups too narrow "
                      f"for it: {', '.join(summary['round_to_relaxed'][:6])}", stacklevel=3)
    if now > goal * (1 + 1e-6):
        warnings.warn(f"StructuredPrune: asked for {goal / reference:.1%} of the reference's "
                      f"{label}, reached only {now / reference:.1%}: the channel graph's "
                      f"estimate and the measured count still differ after four rounds",
                      stacklevel=3)
    elif now < goal - TOLERANCE * reference:
        warnings.warn(f"StructuredPrune: asked for {goal / reference:.1%} of the reference's "
                      f"{label}, reached {now / reference:.1%}: the groups' rounding "
                      f"(round_to={cfg.round_to}) and floors allow no closer value",
                      stacklevel=3)


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


@register(StructuredPrune, kind="prune", needs=("example_inputs",), copy_on_write=True)
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
        summary["reconstruct"] = _refit.refit_after_pruning(pruned, original, summary, ctx, x,
                                                                scope=cfg.refit_scope)
    data = ctx.calibration if ctx.calibration is not None else ctx.train
    if data is not None and cfg.recalibrate_bn and summary["groups"] \
            and "reconstruct" not in summary:
        summary["bn_recalibrated_batches"] = recalibrate_batchnorm(pruned, data,
                                                                   limit=cfg.recalibrate_bn)
    _slice_masks(ctx, summary.pop("kept"))
    ctx.record(cfg.type_name(), **summary)
    return pruned
