"""Post-training structured pruning of transformers: heads and FFN neurons, no retraining.

``FisherPrune(macs=0.5)`` follows Kwon et al. 2022 ("A Fast Post-Training Pruning Framework
for Transformers"): on a few calibration batches it

1. maps the model's removable units with the channel graph (:mod:`netpress.graph`), the same
   map :class:`~netpress.prune.structured.StructuredPrune` uses: attention heads (a key/value
   head together with its query heads under grouped-query attention) and FFN neurons, each
   read by one Linear layer (``o_proj`` / ``down_proj``, ``attention.output.dense`` /
   ``output.dense``);
2. scores every unit by the diagonal Fisher information of a mask on it
   (:mod:`netpress.prune.fisher`), from per-sample gradients of the model's own loss: next
   token cross-entropy for language models, cross-entropy on labels sampled from the model
   for classifiers, a Gaussian likelihood of the (mask-pooled) output otherwise;
3. removes the units of least Fisher per MAC until the MACs target is met, every layer
   keeping at least a floor of its heads and of its neurons (``min_fraction``; by default
   90% of the share the target leaves on average, ``min_share``;
   :mod:`netpress.prune.fisher_select`); which units of a group go is then chosen by
   greedy group OBS on the layer reading them (``rank="obs"``, the default,
   :mod:`netpress.prune.obs_rank`) or by least Fisher score (``rank="fisher"``);
4. cuts them out (:func:`netpress.prune.surgery.remove_units`) and refits the Linear layers
   by ridge least squares: by default every Linear of every block, block after block, on
   the pruned model's own inputs towards the unpruned model's layer outputs and residual
   sums (:mod:`netpress.prune.refit`; on all-MiniLM-L6-v2 at 50% MACs this takes the
   embedding cosine from 0.70 uncorrected to 0.81, where refitting only the layers that
   read the pruned units, each towards its own original outputs, gives 0.65), and the
   LayerNorm gains and shifts per channel (``refit_norms``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from netpress._cow import assign_
from netpress._inputs import (
    Inputs,
    move_to,
)
from netpress.config import MethodConfig
from netpress.context import Context
from netpress.data import batches
from netpress.errors import ModelError, RecipeError
from netpress.graph import analyze
from netpress.measure.collect import model_device
from netpress.measure.macs import count_macs
from netpress.prune._attention import split_attention
from netpress.prune._blocks import BlockCalls, forward_each
from netpress.prune._fisher_pass import _fisher, _Group, _readers
from netpress.prune.depth import find_block_stack
from netpress.prune.fisher import RefitStats, ridge_refit
from netpress.prune.fisher_select import first as _first
from netpress.prune.fisher_select import removal as _removal
from netpress.prune.fisher_select import select as _select
from netpress.prune.fisher_select import target_floor
from netpress.prune.fisher_select import without as _without
from netpress.prune.obs_rank import RANKS, obs_removals
from netpress.prune.refit import refit_blocks
from netpress.prune.ridge_cv import FOLDS
from netpress.prune.structured import _culprits, _cut
from netpress.prune.surgery import PruneCheckError
from netpress.reconstruct.layers import LayerView, is_hf_conv1d
from netpress.reconstruct.shrinkage import Shrinker, check_setting, intensity
from netpress.registry import register

REFIT_SCOPES = ("blocks", "readers")

__all__ = ["FisherPrune", "fisher_prune", "fisher_cut", "FisherCut", "target_floor"]


@dataclass(frozen=True, kw_only=True)
class FisherPrune(MethodConfig):
    """Remove attention heads and FFN neurons to ``macs`` (a fraction of the reference
    model's MACs) from calibration data alone (see the module docs).

    ``calibration_batches``: batches used for the Fisher scores and the refit (more helps: on
    all-MiniLM-L6-v2 at 50% MACs, 128 -> 512 sentences took the cosine from 0.81 to 0.88;
    the default, 16 batches, is 512 sentences at batch 32). ``refit``:
    least-squares reconstruction after the cut (``damp`` is the ridge, relative to the mean
    input energy; the default ``"auto"`` chooses it per refit group by 2-fold
    cross-validation over the calibration inputs, never below the few-rows floor of
    :func:`netpress.prune.fisher.few_rows_damp`, :mod:`netpress.prune.ridge_cv`: on
    all-MiniLM-L6-v2 at 50% MACs the cosine went 0.647 -> 0.716 with 16 sentences,
    0.767 -> 0.833 with 64 and 0.915 -> 0.923 with 512 against ``damp=0.01``; the report's
    ``refit_damp`` lists the choice per layer): ``refit_scope="blocks"`` refits every
    Linear layer of the block stack, block by block, to the original model's layer outputs
    and residual sums
    (:mod:`netpress.prune.refit`; with ``"auto"`` each block keeps its refit only where its
    out-of-fold errors beat the cut block's, :mod:`netpress.prune.refit_guard`; the
    report's ``refit_guard`` gives that error ratio per block); ``"readers"`` only the
    layers that read the pruned units, each to its own original outputs. ``refit_norms``
    (with ``"blocks"``): the blocks' LayerNorm gains and shifts are refitted too, per
    channel, towards the original's LayerNorm outputs. ``min_units``: units every group
    keeps; ``min_fraction``: the
    fraction of each group's units it keeps at least (0 = the purely global ranking by
    Fisher per MAC, which empties early layers: on all-MiniLM-L6-v2 at 50% MACs it kept
    1-2 of 12 heads in layers 0-2). The default, ``None``, sets that floor from the target:
    ``min_share`` (0.9) times the share of removable units the target leaves on average
    (:func:`target_floor`; 0.45 at 50% MACs on all-MiniLM-L6-v2), so every layer is cut
    about as much and the Fisher ranking moves only the rest. On that model at 50% MACs the
    embedding cosine without training was 0.884 with the global ranking, 0.909 with a fixed
    floor of 0.3, 0.914 with 0.4 and **0.916** with the default (BENCHMARKS.md, issue 13,
    twelfth part); ``refit_norms=True`` adds ~0.003. ``shrinkage``: the share ``α`` by which
    the refits shrink each layer's input correlations toward zero before solving for the
    correction (:mod:`netpress.reconstruct.shrinkage`): ``"auto"`` (the Ledoit-Wolf
    intensity from the calibration rows, ~0 with plentiful data) or a number in [0, 1]; the
    default 0 is the plain ridge. Unlike SparseGPT's, the refit's over-fitting with few
    rows is mostly not cured by it (all-MiniLM-L6-v2, 16 sentences: cosine 0.664 for
    the cut alone, 0.327 refitted, 0.337 with ``"auto"``, 0.684 with ``damp=1``; at 512
    sentences ``"auto"`` costs 0.001), so it is opt-in; a larger ``damp`` is the stronger
    lever with few calibration rows (BENCHMARKS.md, "Hessian shrinkage in the refits"). The
    report lists it per layer (``shrinkage``) with ``min_rows_per_column``; a warning names
    layers with fewer calibration rows than inputs. ``rank``: which units of a group go once
    the selection has fixed how many: ``"obs"`` (default) those its reading layer's
    least-squares compensation misses least (greedy group OBS, :mod:`netpress.prune.obs_rank`;
    all-MiniLM-L6-v2 at 50% MACs, 512 sentences: cosine 0.924 -> 0.937), ``"fisher"`` those
    of least Fisher score (Kwon et al.).
    """

    macs: float = 0.5
    calibration_batches: int = 16
    refit: bool = True
    refit_scope: str = "blocks"
    refit_norms: bool = True
    damp: float | str = "auto"
    shrinkage: float | str = 0.0
    min_units: int = 1
    min_fraction: float | None = None
    min_share: float = 0.9
    seed: int = 0
    rank: str = "obs"

    def __post_init__(self) -> None:
        name = self.type_name()
        if isinstance(self.macs, bool) or not isinstance(self.macs, (int, float)) \
                or not 0 < self.macs <= 1:
            raise RecipeError(f"{name}: macs={self.macs!r} must be a fraction in (0, 1]")
        for field_name, low in (("calibration_batches", 1), ("min_units", 1), ("seed", 0)):
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise RecipeError(f"{name}: {field_name}={v!r} must be an int >= {low}")
        f = self.min_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float))
                              or not 0 <= f < 1):
            raise RecipeError(f"{name}: min_fraction={f!r} must be a fraction in [0, 1) or "
                              "None (a floor set from the target, see min_share)")
        f = self.min_share
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise RecipeError(f"{name}: min_share={f!r} must be a fraction in [0, 1]")
        if self.damp != "auto" and (not isinstance(self.damp, (int, float))
                                    or isinstance(self.damp, bool) or self.damp <= 0):
            raise RecipeError(f"{name}: damp={self.damp!r} must be a number > 0 or 'auto' "
                              "(chosen per layer by cross-validation on the calibration data)")
        check_setting(name, self.shrinkage)
        for flag in ("refit", "refit_norms"):
            if not isinstance(getattr(self, flag), bool):
                raise RecipeError(f"{name}: {flag} must be true or false")
        if self.rank not in RANKS:
            raise RecipeError(f"{name}: rank={self.rank!r}; choose one of {RANKS}")
        if self.refit_scope not in REFIT_SCOPES:
            raise RecipeError(f"{name}: refit_scope={self.refit_scope!r}; choose one of "
                              f"{REFIT_SCOPES}")


def _inputs_of(model: nn.Module, names: list[str], data: list[Any],
               stop_after: str | None = None) -> dict[str, list[torch.Tensor]]:
    """The real-token input rows of each named Linear, per batch (forward stops early after
    ``stop_after``)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    real: dict[str, Any] = {}

    class _Stop(Exception):
        pass

    def hook(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            mask = real.get("mask")
            rows = x[mask] if mask is not None and x.dim() == 3 and \
                mask.shape == x.shape[:2] else x.reshape(-1, x.shape[-1])
            seen[name].append(rows.float().cpu())
            if name == stop_after:
                raise _Stop
        return fn

    def before(x: Any) -> None:
        mask = x.get("attention_mask") if isinstance(x, dict) else None
        real["mask"] = mask.bool() if isinstance(mask, torch.Tensor) else None

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    forward_each(model, data, handles, _Stop, before)
    return seen


def _refit(model: nn.Module, original: nn.Module, readers: list[str],
           kept: dict[str, torch.Tensor], data: list[Any], damp: float | str,
           rows: dict[str, torch.Tensor] | None = None,
           shrinker: Shrinker | None = None,
           chosen: dict[str, float] | None = None) -> int:
    """Refit every reader in forward order; returns how many were refitted. A reader the
    forward calls more than once (a layer shared across depths, as ALBERT's) is fitted on
    all its calls at once, each call's inputs paired with the original's at the same call.
    ``rows``: the output rows a reader kept where its outputs were cut too (its fit
    targets the original's outputs of those rows). ``shrinker``: as in
    :func:`netpress.prune.refit.refit_blocks`; ``chosen`` gets each reader's ridge."""
    order = [n for n, _ in model.named_modules() if n in set(readers)]
    targets = _inputs_of(original, order, data)
    modules = dict(model.named_modules())
    originals = dict(original.named_modules())
    for name in order:
        shared = len(targets[name]) != len(data)  # called more than once per forward
        now = _inputs_of(model, [name], data, stop_after=None if shared else name)[name]
        if len(now) != len(targets[name]):
            raise ModelError(f"FisherPrune: {name!r} is called {len(now)} times on the "
                             f"calibration data after pruning and {len(targets[name])} times "
                             "before; use refit=False")
        stats = RefitStats(folds=FOLDS if damp == "auto" else 0)
        for xc, xo in zip(now, targets[name]):
            stats.add(xc, xo)
        layer, old = modules[name], originals[name]
        before = LayerView(old, name).matrix(torch.float32)[0].cpu()  # out x in (Conv1D too)
        cols = kept.get(name, torch.arange(before.shape[1]))
        out = (rows or {}).get(name, torch.arange(before.shape[0])).cpu()
        bias = getattr(old, "bias", None)
        alpha = 0.0
        if shrinker is not None and stats.hessian is not None:
            alpha = intensity(shrinker.setting, stats.hessian, stats.rows)
            shrinker.record([name], alpha, stats.rows, stats.hessian.shape[0] - 1)
        used: list[float] = []
        w, b = ridge_refit(before[out], None if bias is None else bias.detach().cpu()[out],
                           cols, stats, damp, alpha, used)
        if chosen is not None:
            chosen[name] = used[0]
        with torch.no_grad():  # new tensors (assign_): the old ones may be shared
            LayerView(layer, name).set_matrix(w[None])
            if layer.bias is not None:
                assign_(layer.bias, b)
            elif bool(b.abs().max() > 0):
                layer.bias = nn.Parameter(b.to(layer.weight.device))
    return len(order)


#: What FisherPrune adds to the few-calibration-rows warning, by ``damp``: measured on
#: all-MiniLM-L6-v2 at 50% MACs with 16 sentences, the plain refit (damp 0.01) took the
#: cosine from 0.664 (the cut alone) to 0.327, with its few-rows ridge floor
#: (`fisher.few_rows_damp`) to 0.647, ``damp=1`` to 0.684 and ``damp="auto"`` to 0.716
#: (BENCHMARKS.md, "Hessian shrinkage in the refits").
_FEW_ROWS_ADVICE = {
    "auto": ("; the refits' ridges were chosen by cross-validation on these samples "
             "(refit_damp in the report: 100 leaves a layer as the cut made it), or skip the "
             "refit with refit=False"),
    "auto-blocks": ("; the refits' ridges were chosen by cross-validation on these samples "
                    "(refit_damp in the report: 100 leaves a layer as the cut made it) and "
                    "each block's refit was kept only where it beat the cut on held-out "
                    "samples (refit_guard: >= 1 was rejected), or skip the refit with "
                    "refit=False"),
    "number": ("; or, with few samples, let each refit's ridge be chosen on held-out samples "
               "(damp='auto', the default) or do not refit (refit=False): the refit can then "
               "undo more than the cut costs"),
}


@dataclass
class FisherCut:
    """The pruned copy before any refit, with what the refits need: the unpruned copy
    (attention split as in ``model``), the kept input columns of each reading layer, the kept
    output rows of every cut layer, and the summary."""

    model: nn.Module
    original: nn.Module
    readers: list[str]
    kept_columns: dict[str, torch.Tensor]
    kept_rows: dict[str, torch.Tensor]
    summary: dict[str, Any]


def fisher_cut(model: nn.Module, cfg: FisherPrune, example_inputs: Inputs, data: list[Any],
               reference_macs: int | None = None, *, inplace: bool = False) -> FisherCut:
    """Score, select and cut out units of a copy of ``model`` (steps 1-3 of the module docs).

    ``inplace=True`` cuts ``model`` itself, and the unpruned ``original`` shares the tensors
    the cut leaves alone with it instead of being a full copy (two model copies fewer; the
    refits give the layers they fit new tensors, :func:`netpress._cow.assign_`, and never
    write into shared ones): for a caller that owns ``model`` and drops ``original`` before
    changing the pruned model further."""
    work = model if inplace else copy.deepcopy(model)
    split_attention(work, example_inputs)
    original = _shared_copy(work) if inplace else copy.deepcopy(work)
    graph = analyze(work, example_inputs)
    groups = _readers(work, graph)
    if not groups:
        found = [g.name for g in graph.groups if g.exact]
        what = (f"; the removable groups found ({len(found)}: {', '.join(_first(found))}) are "
                "read by several layers, a convolution or a parameter holding every expert of "
                "a mixture of experts") if found else ""
        raise ModelError("FisherPrune: no attention head or FFN neuron group read by a single "
                         f"Linear (or transformers Conv1D) layer was found{what}; use "
                         "StructuredPrune for this model")
    unscored: dict[str, str] = {}
    scores = _fisher(work, groups, data, cfg.seed, unscored)
    groups = _scored(groups, unscored)
    none = np.zeros(graph.blocked.size, dtype=bool)
    base = max(1, graph.macs(none))
    now = count_macs(work, example_inputs)
    goal = cfg.macs * (reference_macs if reference_macs is not None else now)
    owner = {int(u): i for i, g in enumerate(graph.groups) for u in g.units}
    whole: dict[str, str] = {}  # group name: why its sizes could not follow
    for _ in range(len(groups) + 1):
        parts, floor = _select(graph, groups, scores, cfg, goal, now, base, whole)
        if cfg.rank == "obs":
            parts = obs_removals(work, groups, parts, data)
        pruned = _removal(graph, groups, parts)
        try:
            result = _cut(work, graph, pruned, example_inputs)
            break
        except PruneCheckError as exc:
            bad = _culprits(graph, owner, pruned, exc, set(whole))
            if not bad:
                raise
            whole.update({name: str(exc) for name in bad})
            groups, parts = _without(graph, groups, set(bad)), []
            if not groups:
                raise ModelError(f"FisherPrune: no head or FFN neuron group could be cut "
                                 f"without breaking a size the model's code builds: {exc}. "
                                 "Use StructuredPrune for this model") from None
            warnings.warn(f"FisherPrune: leaving {', '.join(_first(bad, 4))} whole: {exc}",
                          stacklevel=3)
    else:
        raise ModelError("FisherPrune: no group could be pruned safely")
    weights = {name.removesuffix(".weight"): dims for name, dims in result.kept.items()
               if name.endswith(".weight")}
    modules = dict(work.named_modules())
    # the weight dims of a layer's outputs and inputs: (1, 0) for transformers' Conv1D
    out_in = {n: (1, 0) if n in modules and is_hf_conv1d(modules[n]) else (0, 1)
              for n in weights}
    summary = {"macs_before": int(now), "macs_after": count_macs(work, example_inputs),
               "macs_target": int(goal), "min_fraction": round(float(floor), 4),
               "rank": cfg.rank,
               "groups": {graph.groups[g.index].name: [len(p), int(len(p) - p.sum())]
                          for g, p in zip(groups, parts) if p.any()}}
    if unscored:
        summary["unscored"] = dict(unscored)
    if whole:
        summary["left_whole"] = dict(whole)
    return FisherCut(work, original, [g.reader for g in groups],
                     {n: d[out_in[n][1]] for n, d in weights.items() if out_in[n][1] in d},
                     {n: d[out_in[n][0]] for n, d in weights.items() if out_in[n][0] in d},
                     summary)


def _scored(groups: list[_Group], unscored: dict[str, str]) -> list[_Group]:
    """The groups that got Fisher scores; those read by an ``unscored`` layer are left
    whole, with a warning naming the layers (an error if that leaves none)."""
    if not unscored:
        return groups
    what = "; ".join(f"{name!r}: {why}" for name, why in list(unscored.items())[:3]) \
        + (f"; and {len(unscored) - 3} more" if len(unscored) > 3 else "")
    left = [g for g in groups if g.reader not in unscored]
    if not left:
        raise ModelError(f"FisherPrune: no unit group could be scored: {what}. Use "
                         "StructuredPrune for this model")
    warnings.warn(f"FisherPrune: the units read by {len(unscored)} layer(s) are left whole, "
                  f"no Fisher score reached them: {what}", stacklevel=3)
    return left


def _shared_copy(model: nn.Module) -> nn.Module:
    from netpress.api import _shared_copy as shared  # api imports the methods

    return shared(model)


def _refit_scope(model: nn.Module, cfg: FisherPrune, data: list[Any]) -> str:
    """``cfg.refit_scope``, or ``"readers"`` (with a warning) where ``"blocks"`` finds no
    stack of blocks that each run once per forward (ALBERT: one layer, shared, called once
    per depth; ModernVBERT: the longest stack is a vision tower that text never reaches)."""
    if cfg.refit_scope != "blocks" or not cfg.refit:
        return cfg.refit_scope
    try:
        _, stack = find_block_stack(model)
        BlockCalls.record(model, stack, data[:1])
    except ModelError as exc:
        warnings.warn(f"FisherPrune: {type(model).__name__}: {exc}; for refit_scope='blocks' "
                      "the layers reading the pruned units are refitted instead "
                      "(refit_scope='readers')", stacklevel=3)
        return "readers"
    return "blocks"


def fisher_prune(model: nn.Module, cfg: FisherPrune, example_inputs: Inputs, data: list[Any],
                 reference_macs: int | None = None, *,
                 inplace: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Prune a copy of ``model`` (``model`` itself with ``inplace``, see :func:`fisher_cut`;
    see the module docs); returns it and a summary."""
    cut = fisher_cut(model, cfg, example_inputs, data, reference_macs, inplace=inplace)
    refitted, scope = 0, _refit_scope(cut.model, cfg, data)
    shrinker = Shrinker(cfg.shrinkage)
    chosen: dict[str, float] = {}
    guarded: dict[str, float] = {}
    if cfg.refit and scope == "readers":
        refitted = _refit(cut.model, cut.original, cut.readers, cut.kept_columns, data,
                          cfg.damp, cut.kept_rows, shrinker, chosen)
    elif cfg.refit:
        refitted = len(refit_blocks(cut.model, cut.original, data, kept_rows=cut.kept_rows,
                                    damp=cfg.damp, norms=cfg.refit_norms, shrinker=shrinker,
                                    chosen=chosen, guarded=guarded))
    pruned, summary = cut.model, {**cut.summary, "refitted_layers": refitted}
    if cfg.refit:
        summary["refit_scope"] = scope
        summary["refit_damp"] = {k: float(f"{v:.4g}") for k, v in chosen.items()}
        if guarded:
            summary["refit_guard"] = {k: float(f"{v:.4g}") for k, v in guarded.items()}
        summary.update(shrinker.summary())
        shrinker.warn(cfg.type_name(),
                      _FEW_ROWS_ADVICE["number" if cfg.damp != "auto" else
                                       "auto-blocks" if scope == "blocks" else "auto"])
    del cut  # the unpruned original; with inplace it shares tensors with the pruned model
    return pruned, summary


@register(FisherPrune, kind="prune", needs=("calibration", "example_inputs"),
          copy_on_write=True)
def _apply(model: nn.Module, cfg: FisherPrune, ctx: Context) -> nn.Module:
    x = ctx.require("example_inputs", by=cfg.type_name())
    source = ctx.require("calibration", by=cfg.type_name())
    device = model_device(model)
    data = [move_to(b, device) for i, (b, _) in enumerate(batches(source, name="calibration"))
            if i < cfg.calibration_batches]
    # compress() hands every step its own working copy (and drops it if the step fails):
    # cutting it in place saves two full model copies (BERT-base: 2 x 418 MB)
    pruned, summary = fisher_prune(model, cfg, x, data,
                                   reference_macs=count_macs(ctx.reference, x), inplace=True)
    ctx.record(cfg.type_name(), **summary)
    return pruned
