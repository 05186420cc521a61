"""Least-squares reconstruction after structured pruning (He et al. 2017; ThiNet).

Removing channels changes what the layers reading them (their *consumers*) receive. Each
consumer is refitted so that, from the inputs it now gets in the pruned model, it
reproduces the outputs the *unpruned* model's layer gave on the same calibration inputs:
``min ‖X_c W'ᵀ - X_o W_oᵀ‖²`` over its kept input columns, with the bias when it has one
(:func:`netpress.reconstruct.lstsq.refit_target` with ``start``). The layers are fitted in
the order the model calls them by the sequential engine
(:func:`netpress.reconstruct.engine.run_sequential`): each sees the inputs of the model as
pruned *and refitted so far*, so errors do not compound. This works whatever coupled the
removed channels (a residual stream, attention heads, a concatenation): a consumer is just
a layer whose input columns were removed, and a layer whose outputs were removed is fitted
to the original's outputs of the rows it kept.

``scope="all"`` refits every layer of the model the engine can handle, not only the
consumers: a layer downstream of a pruned one sees drifted inputs too and can compensate.

The composition of kept indices over pruning rounds is :func:`compose_kept`; which layers
are fitted and on which of the original's rows and columns is :func:`plan_refit`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from netpress._cow import assign_
from netpress._inputs import Inputs
from netpress.context import Context
from netpress.data import Data
from netpress.prune._attention import split_attention
from netpress.reconstruct._measure import measured
from netpress.reconstruct.engine import LayerStats, Solve, run_sequential
from netpress.reconstruct.layers import LayerView, is_hf_conv1d, supported
from netpress.reconstruct.lstsq import refit_target, with_bias

__all__ = ["SCOPES", "LayerFit", "compose_kept", "plan_refit", "refit_pruned", "original_of",
           "refit_after_pruning"]

SCOPES = ("consumers", "all")

#: per parameter name, the kept indices per dimension of each pruning round
KeptRounds = Mapping[str, Sequence[Mapping[int, torch.Tensor]]]


@dataclass(frozen=True)
class LayerFit:
    """What one refitted layer keeps of the original's weight matrix: its ``rows`` (output
    units) and matrix ``columns`` (None: all of them)."""

    rows: torch.Tensor | None
    columns: torch.Tensor | None


def compose_kept(rounds: Sequence[Mapping[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Indices into the *original* tensor per dimension, from each round's kept indices
    (each into the tensor as the previous round left it)."""
    out: dict[int, torch.Tensor] = {}
    for dims in rounds:
        for d, idx in dims.items():
            idx = idx.long().cpu()
            out[d] = out[d][idx] if d in out else idx
    return out


def _dims(module: nn.Module) -> tuple[int, int]:
    """``(input dim, output dim)`` of the layer's weight tensor."""
    return (0, 1) if is_hf_conv1d(module) else (1, 0)


def _columns(module: nn.Module, channels: torch.Tensor | None) -> torch.Tensor | None:
    """Matrix columns of the kept input channels: a conv's channel owns ``k`` im2col columns
    (its kernel positions, channel-major)."""
    if channels is None or not isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return channels
    k = math.prod(module.kernel_size)
    return (channels[:, None] * k + torch.arange(k)[None, :]).reshape(-1)


def _fits(module: nn.Module, original: nn.Module) -> bool:
    """Layers both models hold as a one-group layer of the same kind."""
    return type(module) is type(original) and supported(module) \
        and getattr(module, "groups", 1) == 1 and getattr(original, "groups", 1) == 1


def plan_refit(model: nn.Module, original: nn.Module, kept: KeptRounds,
               scope: str = "consumers") -> dict[str, LayerFit]:
    """The layers to refit, in module order, with the original's rows and columns each
    keeps. ``consumers``: layers whose input columns were removed; ``all``: every layer the
    engine handles (one conv group) that both models hold."""
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}; choose one of {SCOPES}")
    originals = dict(original.named_modules())
    out: dict[str, LayerFit] = {}
    for name, m in model.named_modules():
        o = originals.get(name)
        if not name or o is None or not _fits(m, o):
            continue
        dims = compose_kept(kept.get(f"{name}.weight", ()))
        in_dim, out_dim = _dims(m)
        if scope == "consumers" and in_dim not in dims:
            continue
        fit = LayerFit(dims.get(out_dim), _columns(m, dims.get(in_dim)))
        now, then = LayerView(m, name).shape, LayerView(o, name).shape
        rows = then[1] if fit.rows is None else len(fit.rows)
        cols = then[2] if fit.columns is None else len(fit.columns)
        if (rows, cols) == now[1:]:  # else another step reshaped it: leave it
            out[name] = fit
    return out


def _bias(module: nn.Module, rows: torch.Tensor | None, count: int) -> torch.Tensor:
    """The layer's bias over ``rows`` (float64; zeros for a layer without one)."""
    b = getattr(module, "bias", None)
    if not isinstance(b, torch.Tensor):
        return torch.zeros(count, dtype=torch.float64)
    b = b.detach().double()
    return b if rows is None else b[rows]


def _solver(original: nn.Module, fits: dict[str, LayerFit], norms: Mapping[str, nn.Module],
            damp: float, failed: list[str]) -> Solve:
    """Fit each layer to the original's rows; with an intercept when it has a bias or feeds
    a BatchNorm alone (``norms``), which then absorbs it: ``BN(y + b)`` is ``BN(y)`` with
    its running mean lowered by ``b``."""
    def solve(name: str, view: LayerView, stats: LayerStats) -> None:
        assert stats.hessian is not None and stats.cross is not None
        fit, ref = fits[name], original.get_submodule(name)
        w = LayerView(ref, name).matrix()[0]
        w = w if fit.rows is None else w[fit.rows]
        start = view.matrix()[0]
        h, m = stats.hessian[0], stats.cross[0]
        bias, norm = getattr(view.module, "bias", None), norms.get(name)
        intercept = isinstance(bias, torch.Tensor) or norm is not None
        if intercept:
            assert stats.mean is not None and stats.orig_mean is not None
            h, m = with_bias(h, m, stats.mean[0], stats.orig_mean[0])
            w = torch.cat([w, _bias(ref, fit.rows, w.shape[0])[:, None]], 1)
            start = torch.cat([start, _bias(view.module, None, start.shape[0])[:, None]], 1)
        try:
            new = refit_target(w, h, m, damp, start=start)
        except torch.linalg.LinAlgError:
            new = torch.full_like(start, math.nan)
        if not bool(torch.isfinite(new).all()):
            failed.append(name)
            return
        d = view.shape[2]
        view.set_matrix(new[None, :, :d])
        with torch.no_grad():
            if isinstance(bias, torch.Tensor):
                assign_(bias, new[:, d])
            elif norm is not None:
                mean = norm.running_mean
                assert isinstance(mean, torch.Tensor)
                assign_(mean, mean - new[:, d].to(mean.dtype))
    return solve


def _norms_after(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """The BatchNorm each bias-free layer of ``names`` feeds alone (traced; none when the
    model cannot be traced)."""
    from netpress.quant.fold import fold_bn_pairs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pairs = fold_bn_pairs(model)
        except Exception:  # an optional refinement: without it, no intercept
            return {}
    wanted = set(names)
    return {a: model.get_submodule(b) for a, b in pairs
            if a in wanted and getattr(model.get_submodule(a), "bias", None) is None
            and getattr(model.get_submodule(b), "running_mean", None) is not None}


def refit_pruned(model: nn.Module, original: nn.Module, kept: KeptRounds, data: Data, *,
                 scope: str = "consumers", damp: float = 0.01, intercept: bool = True,
                 max_batches: int | None = None) -> dict[str, Any]:
    """Refit ``model`` (pruned from ``original``, in place) on the calibration ``data``;
    returns a summary (layers refitted, calibration time).

    ``kept`` holds the kept indices of every pruned parameter per round (as
    ``StructuredPrune`` records them); layer names must be the same in both models. A layer
    whose fit is singular stays as pruned (named in ``not_refitted``, with a warning).
    ``intercept``: a bias-free layer feeding a BatchNorm alone is fitted with an intercept,
    folded into that BatchNorm's running mean.
    """
    fits = plan_refit(model, original, kept, scope)
    if not fits:
        return {"refitted_layers": 0}
    failed: list[str] = []
    norms = _norms_after(model, list(fits)) if intercept else {}
    info = run_sequential(model, original, list(fits), data,
                          _solver(original, fits, norms, damp, failed),
                          mode="sequential", max_batches=max_batches)
    skipped = failed + info["not_called"]
    if failed:
        warnings.warn(f"structured reconstruction: no stable least-squares fit for "
                      f"{', '.join(failed[:6])}; left as pruned", stacklevel=3)
    return {"refitted_layers": len(fits) - len(skipped), "not_refitted": skipped,
            "calibration_seconds": info["calibration_seconds"]}


def original_of(model: nn.Module, reference: nn.Module) -> nn.Module:
    """The unpruned model to fit to: ``reference`` when ``model`` still holds exactly its
    tensors (the first step of a recipe: no copy), else a frozen copy of ``model``."""
    a, b = model.state_dict(), reference.state_dict()
    if a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k])
                                    for k in a):
        return reference
    return copy.deepcopy(model).eval()


def refit_after_pruning(pruned: nn.Module, original: nn.Module, summary: Mapping[str, Any],
                        ctx: Context, example_inputs: Inputs, *,
                        scope: str = "consumers") -> dict[str, Any]:
    """``StructuredPrune``'s hook: refit ``pruned`` to ``original`` on the context's
    calibration data, from the pruning ``summary`` (its kept indices, the attention modules
    it split into projections, which the original is split alike for)."""
    if summary.get("split_attention"):
        original = copy.deepcopy(original)
        split_attention(original, example_inputs)
    data = ctx.require("calibration", by="StructuredPrune(reconstruct=True)")
    with measured() as cost:
        out = refit_pruned(pruned, original, summary["kept"], data, scope=scope)
    return {**out, **cost}
