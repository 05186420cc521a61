"""``GPTQ``: weight-only quantization with error compensation from calibration data.

``GPTQ(bits=4, group_size=128)`` rounds each selected layer's weights column by column,
spreading every rounding error over the columns not yet rounded (see
:mod:`netpress.reconstruct.gptq`), and leaves a
:class:`~netpress.reconstruct.modules.GroupQuantLinear` / ``GroupQuantConv`` holding the
integer codes, float16 scales and zero points, stored packed in the artefact.
``rounding="nearest"`` is the round-to-nearest baseline on the same grids (no data needed).
Weights a previous pruning step zeroed stay exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from netpress.context import Context
from netpress.errors import RecipeError
from netpress.quant.primitives import MAX_BITS, MIN_BITS
from netpress.quant.ptq import drop_masks
from netpress.reconstruct._common import (
    LayerwiseSettings,
    _check_int,
    calibrate,
    fitted_to,
    fitting_reference,
    tied_weights,
)
from netpress.reconstruct._measure import measured, trim_heap
from netpress.reconstruct.engine import LayerStats
from netpress.reconstruct.gptq import OBSERVERS, GPTQResult, gptq_quantize, rtn_quantize
from netpress.reconstruct.layers import LayerView
from netpress.reconstruct.lstsq import refit_target
from netpress.reconstruct.modules import (
    GroupQuantConv,
    GroupQuantEmbedding,
    GroupQuantLinear,
    GroupQuantWeight,
)
from netpress.reconstruct.obs import Handover
from netpress.registry import register

__all__ = ["GPTQ", "ROUNDINGS"]

ROUNDINGS = ("gptq", "nearest")


@dataclass(frozen=True, kw_only=True)
class GPTQ(LayerwiseSettings):
    """Weight-only ``bits``-bit quantization with GPTQ error compensation.

    ``group_size`` columns share a scale (``None``: one per output channel); ``act_order``
    visits the most active inputs first; ``symmetric`` uses signed codes with zero point 0;
    ``observer`` picks each group's range (``minmax`` or ``mse``); ``rounding="nearest"``
    is the round-to-nearest baseline.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    act_order: bool = True
    observer: str = "minmax"
    rounding: str = "gptq"

    def __post_init__(self) -> None:
        name = self.type_name()
        self._check_layerwise()
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) \
                or not MIN_BITS <= self.bits <= MAX_BITS:
            raise RecipeError(f"{name}: bits={self.bits!r} must be an int in "
                              f"[{MIN_BITS}, {MAX_BITS}]")
        if self.group_size is not None:
            _check_int(name, "group_size", self.group_size)
        for key in ("symmetric", "act_order"):
            if not isinstance(getattr(self, key), bool):
                raise RecipeError(f"{name}: {key} must be true or false")
        if self.observer not in OBSERVERS:
            raise RecipeError(f"{name}: observer={self.observer!r}; choose one of {OBSERVERS}")
        if self.rounding not in ROUNDINGS:
            raise RecipeError(f"{name}: rounding={self.rounding!r}; choose one of {ROUNDINGS}")


def _mask(ctx: Context, name: str, view: LayerView) -> torch.Tensor | None:
    keep = ctx.masks.get(f"{name}.weight")
    if keep is None or tuple(keep.shape) != tuple(view.weight.shape):
        return None
    return view.matrix_layout(keep.to(view.weight.device))


def _refit(cfg: GPTQ, w: torch.Tensor, stats: LayerStats | None) -> None:
    """Refit ``w`` (groups × rows × d) in place towards the original model's outputs
    (sequential mode), then drop the cross term from this layer's ``stats``: it is not needed
    past the refit, and freeing it before the GPTQ sweep takes one d x d float64 matrix off
    the fit's peak (75 MB for a 3072-wide layer)."""
    if stats is None or stats.cross is None:
        return
    assert stats.hessian is not None
    if stats.owned and w.shape[0] == 1:  # the cross term handed over: M - H formed in it
        cross, stats.cross = Handover(stats.cross[0]), None
        w[0] = refit_target(w[0], stats.hessian[0], cross, cfg.damp)
        return
    for g in range(w.shape[0]):
        w[g] = refit_target(w[g], stats.hessian[g], stats.cross[g], cfg.damp)
    stats.cross = None


def _quantize_group(cfg: GPTQ, w: torch.Tensor, stats: LayerStats | None, g: int,
                    mask: torch.Tensor | None) -> GPTQResult:
    if stats is None:
        return rtn_quantize(w, cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric,
                            observer=cfg.observer, mask=mask)
    assert stats.hessian is not None
    hessian: torch.Tensor | Handover
    if stats.owned and stats.hessian.shape[0] == 1:  # its last use: hand it over
        hessian, stats.hessian = Handover(stats.hessian[0]), None
    else:
        hessian = stats.hessian[g]
    return gptq_quantize(w, hessian, cfg.bits, group_size=cfg.group_size,
                         symmetric=cfg.symmetric, act_order=cfg.act_order,
                         observer=cfg.observer, mask=mask, blocksize=cfg.blocksize,
                         damp=cfg.damp)


def _quantized_layer(cfg: GPTQ, view: LayerView, results: list[GPTQResult]) -> nn.Module:
    """The group-quantized counterpart of ``view``'s layer holding ``results``' codes."""
    module, d = view.module, view.shape[2]
    gs = cfg.group_size or d
    q: GroupQuantWeight
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        q = GroupQuantConv.like(module, cfg.bits, gs, cfg.symmetric)
    else:
        out = view.shape[0] * view.shape[1]
        q = GroupQuantLinear(d, out, module.bias is not None, cfg.bits, gs,
                             cfg.symmetric).to(view.weight.device)
    zero = None if cfg.symmetric else torch.cat([r.zero for r in results]).to(torch.uint8)
    q.set_codes(torch.cat([r.codes for r in results]),
                torch.cat([r.scale for r in results]).half(), zero)
    bias = getattr(module, "bias", None)
    if bias is not None and q.bias is not None:
        with torch.no_grad():
            q.bias.copy_(bias.detach())
    return q


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _retie_tables(model: nn.Module, tied: dict[str, list[str]]) -> dict[str, list[str]]:
    """Input embedding tables that shared a quantized layer's float weight (a language
    model's tied output layer) become :class:`GroupQuantEmbedding` reading that layer's
    codes, so the model keeps one copy of the weight; returns layer -> the tables swapped."""
    out: dict[str, list[str]] = {}
    for name, holders in tied.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, GroupQuantLinear):
            continue
        for holder in holders:
            owner, _, field = holder.rpartition(".")
            table = model.get_submodule(owner) if owner else model
            if field != "weight" or not isinstance(table, nn.Embedding):
                continue  # it keeps the dequantized float values GPTQ wrote into it
            try:
                _set_module(model, owner, GroupQuantEmbedding.tied_to(layer, table))
            except ValueError:  # a table that computes more than a (scaled) lookup: as above
                continue
            out.setdefault(name, []).append(owner)
    return out


@register(GPTQ, kind="quantize", copy_on_write=True,
          needs=lambda cfg: ("calibration",) if cfg.rounding == "gptq" else ())
def _apply_gptq(model: nn.Module, cfg: GPTQ, ctx: Context) -> nn.Module:
    if ctx.schedules:
        raise RecipeError("GPTQ: a gradual pruning ramp is still open; put its recovery step "
                          "before GPTQ")
    names = list(cfg.selected(model))  # names only: a fitted layer's float weights are freed
    tied = tied_weights(model, names)
    done: list[str] = []
    pending: dict[str, list[GPTQResult]] = {}

    def solve(name: str, view: LayerView, stats: LayerStats | None) -> None:
        w, mask = view.matrix(), _mask(ctx, name, view)
        _refit(cfg, w, stats)
        trim_heap()  # the refit's freed temporaries, before the sweep's d x d matrices
        results = [_quantize_group(cfg, w[g], stats, g, None if mask is None else mask[g])
                   for g in range(w.shape[0])]
        del w
        # the float weight takes the dequantized values as before (a weight tied to it sees
        # them), then the layer is swapped for its codes at once: the forwards still to run
        # compute the same outputs, and the fitted layers' float weights (4 bytes a weight
        # against 1) are not held to the end of the pass
        view.set_matrix(torch.stack([r.weight for r in results]))
        codes = [replace(r, weight=r.weight.new_empty(0)) for r in results]
        del results
        if view.hf:  # Conv1D's addmm and F.linear may round differently: swap at the end
            pending[name] = codes
        else:
            _set_module(model, name, _quantized_layer(cfg, view, codes))
        done.append(name)

    with fitting_reference(model, ctx, names) as changed, measured() as info:
        if cfg.rounding == "gptq":
            info.update(calibrate(model, cfg, ctx, names, solve))
        else:
            for name in names:
                solve(name, LayerView(model.get_submodule(name), name), None)
        for name, codes in pending.items():
            view = LayerView(model.get_submodule(name), name)
            _set_module(model, name, _quantized_layer(cfg, view, codes))
    info["fitted_to"] = fitted_to(changed)
    if tables := _retie_tables(model, tied):
        info["tied_tables"] = tables
    drop_masks(model, ctx)
    ctx.record(cfg.type_name(), layers=len(done), bits=cfg.bits, group_size=cfg.group_size,
               symmetric=cfg.symmetric, act_order=cfg.act_order, rounding=cfg.rounding,
               mode=cfg.mode, **info)
    return model
