"""Least-squares refit of a transformer's Linear layers after heads / FFN neurons were removed.

The pruned model is walked block by block over the calibration data
(:class:`~netpress.prune._blocks.BlockCalls`: each block runs on its own, on the hidden
states the pruned model's earlier, already refitted blocks produce). Inside a block the
Linear layers are refitted in the order the block calls them, layers that read one tensor
(query / key / value) together, each by ridge least squares with its bias
(:func:`netpress.prune.fisher.ridge_solve`):

* the inputs ``X_c`` are what the layer now receives in the pruned model;
* the target is what the *original* model computes there for the same tokens: the original
  layer's outputs (its kept output rows) -- or, for a layer whose output is added to a
  residual stream (``o_proj`` / ``attention.output.dense``, ``down_proj`` /
  ``output.dense``: found by perturbing the layer's output and watching which tensor moves
  by exactly that much, :func:`netpress.prune.refit_plan.residual_sink`), the original
  residual sum minus the pruned model's residual, ``Y = z_o - (z_c - y_c)``. The layer
  then also cancels the drift the residual stream carries from the earlier blocks, and the
  sum it feeds (the next LayerNorm's input, or the block's output) matches the original's.

Optionally (``norms=True``) the blocks' LayerNorm layers are refitted too, in call order
between the Linear layers: per channel, gain and shift by ridge least squares so that the
LayerNorm's output on the pruned model's inputs matches the original's output
(:func:`netpress.prune.fisher.ridge_affine`).

With few calibration rows per input column the sums ``X̃ᵀX̃`` are noisy and the fit follows
the calibration tokens (a tiny Phi3 with 128 rows for 64-wide layers: relative output error
0.17 without the refit, 0.31 with it). An optional
:class:`~netpress.reconstruct.shrinkage.Shrinker` shrinks each group's correlations toward
zero before its fit (``"auto"``: the Ledoit-Wolf intensity from the sums and the row count;
:func:`netpress.prune.fisher.ridge_solve`): Phi3 0.29 -> 0.21 at 55% MACs, but on
all-MiniLM-L6-v2 with 16 sentences it barely helps where a larger ridge does (BENCHMARKS.md,
"Hessian shrinkage in the refits").

Only Linear (``transformers``' GPT-2 style ``Conv1D`` included) and LayerNorm layers inside
the block stack are refitted; layers called more than once per block call are left as they
are.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netpress._cow import assign_
from netpress.errors import ModelError
from netpress.measure.collect import evaluating
from netpress.prune._blocks import BlockCalls
from netpress.prune.depth import find_block_stack
from netpress.prune.fisher import few_rows_damp, ridge_affine, ridge_solve
from netpress.prune.refit_guard import (
    TOKEN_POWER,
    BlockFits,
    add_layer_fits,
    add_norm_fits,
    check_block,
    group_fold_fits,
    snapshot,
)
from netpress.prune.refit_plan import OUT as _OUT
from netpress.prune.refit_plan import first_tensor as _first_tensor
from netpress.prune.refit_plan import plan_linear_groups, residual_sink
from netpress.prune.ridge_cv import FOLDS, FoldSums, cv_damp
from netpress.reconstruct._measure import trim_heap
from netpress.reconstruct.layers import LayerView
from netpress.reconstruct.shrinkage import Shrinker, intensity

__all__ = ["refit_blocks", "residual_sink", "plan_linear_groups"]


class _Stop(Exception):
    pass


@dataclass
class _Fit:
    """Running sums of one group: ``X̃ᵀX̃`` and ``X̃ᵀY`` per layer, over ``rows`` rows; with
    ``folds`` (``damp="auto"``) also per fold, all layers' targets side by side."""

    hessian: torch.Tensor | None = None
    xty: dict[str, torch.Tensor] | None = None
    rows: int = 0
    folds: FoldSums | None = None

    def add(self, x: torch.Tensor, targets: dict[str, torch.Tensor], bias: bool,
            ids: torch.Tensor | None = None) -> None:
        x = x.double()
        self.rows += x.shape[0]
        if bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        if self.folds is not None:  # the total is the folds' sum (merge_folds)
            self.folds.add(x, torch.cat([y.double() for y in targets.values()], 1), ids)
        else:
            h = x.T @ x
            self.hessian = h if self.hessian is None else self.hessian.add_(h)  # in place
            del h
        parts = {n: x.T @ y.double() for n, y in targets.items()}
        self.xty = parts if self.xty is None else {n: self.xty[n] + parts[n] for n in parts}

    def total(self) -> torch.Tensor:
        """``X̃ᵀX̃`` over all rows (a new tensor when the sums are kept per fold)."""
        if self.folds is None:
            assert self.hessian is not None
            return self.hessian
        hs = [h for h, _ in self.folds.folds()]
        return sum(hs[1:], hs[0].clone())

    def merge_folds(self) -> None:
        """Sum the folds' ``X̃ᵀX̃`` into ``hessian`` in place (the first fold's tensor) and
        drop the folds: no d x d matrix more than one total."""
        if self.folds is None:
            return
        hs = [h for h, _ in self.folds.folds()]
        self.folds = None
        self.hessian = hs[0]
        for h in hs[1:]:
            self.hessian.add_(h)


class _Tap:
    """Hooks that keep chosen tensors of one block run and stop it once all are there."""

    def __init__(self, block: nn.Module, ins: list[str], outs: list[str]) -> None:
        self.got: dict[tuple[str, str], torch.Tensor] = {}
        self.want = {(n, "in") for n in ins if n != _OUT} | {(n, "out") for n in outs}
        self.handles = []
        for n in set(ins) - {_OUT}:
            self.handles.append(block.get_submodule(n).register_forward_pre_hook(
                self._pre(n), with_kwargs=True))
        for n in outs:
            self.handles.append(block.get_submodule(n).register_forward_hook(self._post(n)))
        self.stops = _OUT not in ins

    def _check(self) -> None:
        if self.stops and self.want <= set(self.got):
            raise _Stop

    def _pre(self, name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _first_tensor(args, kwargs)
            if x is not None and (name, "in") not in self.got:
                self.got[(name, "in")] = x.detach()
            self._check()
        return fn

    def _post(self, name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            self.got.setdefault((name, "out"), out.detach())
            self._check()
        return fn

    def run(self, calls: BlockCalls, block: nn.Module, index: int, batch: int) -> None:
        try:
            out = calls.run(block, index, batch)
            self.got[(_OUT, "in")] = out.detach()
        except _Stop:
            pass

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _run_taps(taps: tuple[_Tap, _Tap], blocks: tuple[nn.Module, nn.Module],
              calls: tuple[BlockCalls, BlockCalls], index: int, batch: int) -> None:
    """Block ``index`` of the pruned and of the original model on ``batch``, each with its
    tap; the taps' hooks are removed afterwards."""
    try:
        for tap, block, call in zip(taps, blocks, calls):
            tap.run(call, block, index, batch)
    finally:
        for tap in taps:
            tap.close()


def _fit_group(names: list[str], sinks: Mapping[str, str | None],
               blocks: tuple[nn.Module, nn.Module], calls: tuple[BlockCalls, BlockCalls],
               index: int, kept_rows: Mapping[str, torch.Tensor], damp: float | str,
               shrinker: Shrinker | None = None, prefix: str = "",
               chosen: dict[str, float] | None = None,
               fits: BlockFits | None = None) -> None:
    """Refit the layers ``names`` (one shared input) of block ``index``; ``shrinker``
    (None: none) shrinks the group's sums before the fits and notes by how much under the
    layers' full names (``prefix`` + name). ``damp="auto"``: one ridge for the group, chosen
    by 2-fold cross-validation on the calibration rows (:func:`cv_damp`); ``chosen`` gets
    each layer's relative ridge under its full name; ``fits`` (with ``"auto"``) gets each
    layer's fits on all folds but one at that ridge (:mod:`netpress.prune.refit_guard`).

    The sums carry a ones column when any layer of the group has a bias; a layer without
    one is fitted on the sums without it (a group fitted without it when only some layers
    had a bias fitted those layers' outputs, bias included, by their weights alone, and
    their bias was added again: xLSTM's gate pre-activations, read with q/k/v, went from
    their exact outputs to a relative output error of 1.2)."""
    cb, ob = blocks
    layers = [cb.get_submodule(n) for n in names]
    bias = any(m.bias is not None for m in layers)
    use = {n: s for n, s in sinks.items() if n in names and s is not None}
    sink_ins = sorted(set(use.values()))
    fit = _Fit(folds=FoldSums(FOLDS) if damp == "auto" else None)
    for b in range(len(calls[0].hidden)):
        ct = _Tap(cb, [names[0], *sink_ins], list(use))
        ot = _Tap(ob, sink_ins, list(names))
        _run_taps((ct, ot), blocks, calls, index, b)
        targets = {}
        for n in names:
            # a sum the pruned model forms at another width than the original (Swin-V2: a
            # sink that is not the residual stream) is no target: the layer's own output is
            if n in use and ot.got[(use[n], "in")].shape == ct.got[(use[n], "in")].shape:
                z_o, z_c = ot.got[(use[n], "in")], ct.got[(use[n], "in")]
                y = z_o - z_c + ct.got[(n, "out")]
            else:
                y = ot.got[(n, "out")]
                rows = kept_rows.get(n)
                if rows is not None:
                    y = y[..., rows.to(y.device)]
            targets[n] = calls[0].rows(y, b)
        x = ct.got[(names[0], "in")]
        fit.add(calls[0].rows(x, b), targets, bias,
                calls[0].rows(_input_ids(x), b) if fit.folds is not None else None)
    assert fit.xty is not None
    width = next(iter(fit.xty.values())).shape[0]
    alpha = 0.0
    if shrinker is not None:
        # a fixed setting reads only the sums' scale: one fold's sums do (no d x d total)
        sums = fit.total() if fit.folds is None or shrinker.setting == "auto" \
            else fit.folds.folds()[0][0]
        alpha = intensity(shrinker.setting, sums, fit.rows)
        del sums
        shrinker.record([prefix + n for n in names], alpha, fit.rows, width - int(bias))
    ridge = few_rows_damp(0.01 if isinstance(damp, str) else damp, width - int(bias), fit.rows)
    if fit.folds is not None and len(fit.folds.folds()) > 1:
        ridge = max(ridge, cv_damp(fit.folds.folds(), _start(layers, names, bias),
                                   shrinkage=alpha))
    held = group_fold_fits(fit.folds.folds() if fit.folds is not None else [], names,
                           layers, bias, ridge, alpha) if fits is not None else None
    fit.merge_folds()
    assert fit.hessian is not None
    if chosen is not None:
        chosen.update({prefix + n: ridge for n in names})
    for i, (n, layer) in enumerate(zip(names, layers)):
        view = LayerView(layer, n)  # out x in, also for transformers' Conv1D (in x out)
        w = view.matrix()[0]
        b0 = layer.bias
        assert b0 is None or isinstance(b0, torch.Tensor)
        theta0 = torch.cat([w, b0.detach().double()[:, None]], 1) if b0 is not None else w
        # without a bias of its own: the sums without the ones column (a view: the in-place
        # damping below touches only its diagonal, which no later layer reads)
        cut = bias and b0 is None
        hessian = fit.hessian[:-1, :-1] if cut else fit.hessian
        xty = fit.xty[n][:-1] if cut else fit.xty[n]
        # the group's last fit damps the Hessian in place: no copy of it
        theta = ridge_solve(hessian, xty, theta0.T.cpu(), ridge, shrinkage=alpha,
                            overwrite=i == len(names) - 1)
        with torch.no_grad():  # new tensors (assign_): the old ones may be shared
            view.set_matrix(theta[:w.shape[1]].T[None])
            if b0 is not None:
                assign_(b0, theta[-1])
        if fits is not None:
            add_layer_fits(fits, view, layer, held[n] if held is not None else None)


def _input_ids(t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``t`` but for a last dimension of 1, holding each position's
    input index (its index along the batch dimension), to be flattened as ``t`` is."""
    shape = (t.shape[0],) + (1,) * (t.dim() - 1)
    return torch.arange(t.shape[0], device=t.device).reshape(shape).expand(
        *t.shape[:-1], 1) if t.dim() >= 2 else torch.arange(t.shape[0], device=t.device)


def _start(layers: list[nn.Module], names: list[str], bias: bool) -> torch.Tensor:
    """The group's current weights side by side, ``[in (+ 1), Σ out]`` in the layout of the
    group's sums (a zero bias row for a layer without one in a group with a bias)."""
    parts = []
    for n, layer in zip(names, layers):
        w = LayerView(layer, n).matrix()[0].detach().double().cpu()
        if bias:
            b0 = layer.bias
            col = b0.detach().double().cpu() if isinstance(b0, torch.Tensor) \
                else w.new_zeros(w.shape[0])
            w = torch.cat([w, col[:, None]], 1)
        parts.append(w.T)
    return torch.cat(parts, 1)


def _fit_norm(name: str, blocks: tuple[nn.Module, nn.Module],
              calls: tuple[BlockCalls, BlockCalls], index: int, damp: float,
              fits: BlockFits | None = None) -> bool:
    """Refit the gain and shift of LayerNorm ``name`` of block ``index`` so that its outputs
    on the pruned model's inputs match the original's outputs (:func:`ridge_affine`).
    False (left as it is) for a LayerNorm without affine parameters, whose input's last
    dimension is not the normalized one (a subclass with its own layout), or that normalizes
    a different number of vectors than the original (a per-head norm after heads were cut).
    ``fits``: gets the gain and shift fitted without each fold's rows."""
    cb, ob = blocks
    norm = cb.get_submodule(name)
    assert isinstance(norm, nn.LayerNorm)
    if norm.weight is None or norm.bias is None or len(norm.normalized_shape) != 1:
        return False
    ns, ys, ids = [], [], []
    for b in range(len(calls[0].hidden)):
        ct, ot = _Tap(cb, [name], []), _Tap(ob, [], [name])
        _run_taps((ct, ot), blocks, calls, index, b)
        z, y = ct.got[(name, "in")], ot.got[(name, "out")]
        if z.shape[-1] != norm.normalized_shape[0]:
            return False  # a subclass normalizing another dim (ConvNeXt's channels_first)
        if z.shape[:-1] != y.shape[:-1]:
            return False  # per-head norms (Persimmon's q/k LayerNorm) after heads were cut
        n = F.layer_norm(z.float(), norm.normalized_shape, eps=norm.eps)
        ns.append(calls[0].rows(n, b).cpu())
        ys.append(calls[0].rows(y, b).cpu())
        ids.append(calls[0].rows(_input_ids(z), b).reshape(-1).cpu())
    if fits is not None:
        add_norm_fits(norm, torch.cat(ns), torch.cat(ys), torch.cat(ids), damp, fits)
    gain, shift = ridge_affine(torch.cat(ns), torch.cat(ys), norm.weight.detach().cpu(),
                               norm.bias.detach().cpu(), damp)
    with torch.no_grad():
        assign_(norm.weight, gain)
        assign_(norm.bias, shift)
    return True


def refit_blocks(model: nn.Module, original: nn.Module, data: list[Any], *,
                 kept_rows: Mapping[str, torch.Tensor] | None = None,
                 damp: float | str = 0.01, residual: bool = True, stack: str | None = None,
                 only: Collection[str] | None = None, norms: bool = False,
                 shrinker: Shrinker | None = None,
                 chosen: dict[str, float] | None = None, guard: bool = True,
                 guarded: dict[str, float] | None = None,
                 guard_power: float = TOKEN_POWER) -> list[str]:
    """Refit every Linear layer in ``model``'s block stack towards ``original`` (same
    structure, wider layers) on the calibration inputs ``data`` (see the module docs).

    ``kept_rows`` maps a layer's full name to the output rows of the original it kept (all
    when absent); ``only`` limits the refit to these full layer names. ``norms``: the
    LayerNorm layers of the blocks too, in call order between the Linear layers, their gain
    and shift refitted per channel towards the original's outputs. ``shrinker``: shrinks
    the Linear layers' sums toward their diagonal before each fit and records by how much
    (None: the plain ridge; the norms' per-channel fits are never shrunk). ``damp``: the
    Linear layers' relative ridge, or ``"auto"``: chosen per group by 2-fold
    cross-validation on the calibration rows (:mod:`netpress.prune.ridge_cv`; the norms then
    use 0.01), each layer's choice written into ``chosen`` when given. ``guard`` (with
    ``"auto"``): each block's refit is kept only where its outputs on held-out calibration
    inputs are closer to the original's than the cut block's
    (:mod:`netpress.prune.refit_guard`); ``guarded`` gets, per block (its full name), the
    refit's held-out error score relative to the cut's (>= 1: the block was left as the cut
    made it); ``guard_power``: the guard's ``q``, how much its worst tokens weigh (default 4,
    measured better with few rows; 1: the total squared error; see the guard's docs). Returns
    the refitted layers' full names (those of blocks the guard rejected left out, also from
    ``chosen``)."""
    if isinstance(damp, str) and damp != "auto":
        raise ValueError(f"damp={damp!r}: a number > 0 or 'auto'")
    norm_damp = 0.01 if isinstance(damp, str) else damp
    path, cstack = find_block_stack(model, stack)
    ostack = original.get_submodule(path)
    if not isinstance(ostack, nn.ModuleList) or len(ostack) != len(cstack):
        raise ModelError(f"the original model has no stack {path!r} of {len(cstack)} blocks")
    calls = (BlockCalls.record(model, cstack, data), BlockCalls.record(original, ostack, data))
    rows = {k.removeprefix(path + "."): v for k, v in (kept_rows or {}).items()}
    done: list[str] = []
    with evaluating(model), evaluating(original):
        for i, (cb, ob) in enumerate(zip(cstack, ostack)):
            folds = BlockFits(FOLDS, guard_power) if guard and damp == "auto" else None
            cut = snapshot(cb) if folds is not None else {}
            block_done: list[str] = []

            def first_batch(cb: nn.Module = cb, i: int = i) -> torch.Tensor:
                return calls[0].run(cb, i, 0)

            groups = plan_linear_groups(cb, first_batch, norms=norms)
            local = {n.removeprefix(f"{i}."): r for n, r in rows.items()
                     if n.startswith(f"{i}.")}
            sinks = {n: residual_sink(cb, n, first_batch) if residual else None
                     for g in groups for n in g
                     if not isinstance(cb.get_submodule(n), nn.LayerNorm)}
            for names in groups:
                if only is not None:
                    names = [n for n in names if f"{path}.{i}.{n}" in only]
                    if not names:
                        continue
                if isinstance(cb.get_submodule(names[0]), nn.LayerNorm):
                    if _fit_norm(names[0], (cb, ob), calls, i, norm_damp, folds):
                        block_done.append(f"{path}.{i}.{names[0]}")
                    continue
                _fit_group(names, sinks, (cb, ob), calls, i, local, damp, shrinker,
                           f"{path}.{i}.", chosen, folds)
                block_done += [f"{path}.{i}.{n}" for n in names]
                trim_heap()  # the fit's float64 temporaries (72 MiB a matrix at 3072 wide)
            calls[1].advance(ob, i)  # the original block's outputs: the guard's targets
            if folds is None or not block_done or \
                    check_block(cb, i, calls, cut, folds, f"{path}.{i}", guarded):
                done += block_done
            elif chosen is not None:  # left as the cut made it: no ridge to report
                for n in block_done:
                    chosen.pop(n, None)
            del folds, cut
            calls[0].advance(cb, i)
    return done
