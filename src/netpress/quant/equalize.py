"""Cross-layer equalization for activation quantization (Nagel et al. 2019), residual streams
included, with factors chosen to minimise the quantization noise reaching the outputs.

A positive factor ``f_c`` per channel commutes with ReLU, addition, pooling, padding and
slicing: multiplying the rows (and biases) of every layer that writes a set of coupled
channels by ``f_c`` and dividing the input columns of every layer that reads them by ``f_c``
leaves the model's function unchanged (:func:`apply_scales`). The coupled sets come from the
channel dependency graph (:func:`coupled_sets`), so a residual stream is one set through all
its blocks and through zero-padded shortcuts into the next stage; a LayerNorm feeding only
Linear layers is a set of its own, its weight and bias scaled (SmoothQuant, Xiao et al. 2023).

What the factors change is the quantization noise. To first order, the output noise is
``sum_k step_k^2 / 12 * sum_c G_kc / f_c^2`` over the per-tensor activation quantizers ``k``
(``step_k`` the step covering every scaled channel's range, ``G_kc`` the squared output
gradient summed over channel ``c`` of that tensor), plus, for each layer whose input columns
are divided, its weight rounding noise ``sum_o step_o^2 / 12 * E_o * sum_c f_c^2 P_c`` (per-row
weight steps ``step_o``, output gradient energy ``E_o``, input power ``P_c``). The scaled
channels get finer steps; the layers reading them get coarser weights. On an x86 CPU without
VNNI (target ``x86-avx2``, :mod:`netpress.quant.target`) a row's weight step is also bounded
below by its largest same-sign adjacent pair (kernel order) over the pair limit, and scaling
columns up can raise that bound; a consumer's :class:`Pairs` put it in the model (the
factors then stay off the pairs that set a row's step).
:func:`quantization_noise` is that model (a pure function) and :func:`optimal_factors`
minimises it over ``log f``; :mod:`netpress.quant._equalize_stats` gathers the statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["ScaleSet", "Location", "Pairs", "Consumer", "kernel_pairs", "coupled_sets",
           "apply_scales", "quantization_noise", "optimal_factors", "MAX_FACTOR"]

_LAYERS = (nn.Conv2d, nn.Linear)
MAX_FACTOR = 16.0


@dataclass
class ScaleSet:
    """Channels that must be scaled together: ``rows`` (producer weights and biases, scaled
    by ``f``) and ``cols`` (consumer weights, divided by ``f``) as ``{layer name: positions
    of each unit}``."""

    name: str
    units: int
    rows: dict[str, list[np.ndarray]]
    cols: dict[str, list[np.ndarray]]


@dataclass
class Location:
    """A per-tensor quantized activation: each channel's unit (-1 when not scaled), its
    minimum, maximum and gradient energy."""

    unit: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    grad2: torch.Tensor


@dataclass
class Pairs:
    """A consumer's adjacent weight pairs in the order x86 u8×s8 kernels read them
    (:func:`netpress.quant.saturation.kernel_rows`): each pair's two units ``(P, 2)`` (-1 when
    not scaled, or padding) and the positive and negative parts of its weights ``(O, P, 2)``;
    a row's step is at least its largest same-sign pair sum over ``limit - 1``
    (:func:`netpress.quant.saturation.pair_safe_scale`)."""

    unit: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    limit: int


@dataclass
class Consumer:
    """A layer whose input columns are scaled: each column's unit (-1 when not scaled), the
    largest ``|W[o, c]|`` over the kernel, each output's gradient energy and each input
    column's power (mean square times kernel taps); ``pairs`` when the target's kernels bound
    the step by pair sums."""

    unit: torch.Tensor
    wmax: torch.Tensor
    out_grad2: torch.Tensor
    in_power: torch.Tensor
    pairs: Pairs | None = None


def kernel_pairs(weight: torch.Tensor, col_unit: torch.Tensor, limit: int) -> Pairs:
    """:class:`Pairs` of a Conv2d or Linear ``weight`` whose input column ``c`` (dimension 1)
    belongs to unit ``col_unit[c]``."""
    from netpress.quant.saturation import adjacent_pairs, kernel_rows

    rows = kernel_rows(weight.detach().double())
    taps = rows.shape[1] // weight.shape[1]
    # kernel order: (kernel row, kernel column, channel); a padded last pair's unit is -1
    unit = col_unit.long().repeat(taps).reshape(1, -1)
    pairs = torch.stack(adjacent_pairs(rows), -1)
    units = torch.stack(adjacent_pairs(unit + 1), -1)[0] - 1
    return Pairs(units, pairs.clamp(min=0), (-pairs).clamp(min=0), limit)


def coupled_sets(model: nn.Module, example_inputs: Any) -> list[ScaleSet]:
    """The sets of coupled channels of ``model``'s Conv2d/Linear layers that can be scaled.

    Sets that touch any other parameter (a norm's weight, an embedding), or the input
    columns of a grouped convolution, are left out.
    """
    from netpress.graph.groups import _groups, analyze

    graph = analyze(model, example_inputs)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _LAYERS)}
    owner = {id(p): name for name, m in layers.items() for p in m.parameters(recurse=False)}
    weights = {id(m.weight) for m in layers.values()}
    sets = []
    free = np.zeros_like(graph.blocked)  # padded channels scale like any other
    for group in _groups(graph.trace, graph.spaces, graph.labels, free):
        rows: dict[str, list[np.ndarray]] = {}
        cols: dict[str, list[np.ndarray]] = {}
        ok = True
        for (pid, dim), per_unit in group.slices.items():
            tensor = graph.param(pid)
            name = owner.get(id(tensor))
            if name is None or (dim == 1 and (id(tensor) not in weights or getattr(
                    layers[name], "groups", 1) != 1)) or dim > 1:
                ok = False
                break
            (rows if dim == 0 else cols).setdefault(name, per_unit)
        if ok and rows and cols:
            sets.append(ScaleSet(group.name, len(group), rows, cols))
    return sets + _norm_sets(model)


def _norm_sets(model: nn.Module) -> list[ScaleSet]:
    """SmoothQuant's sets: a LayerNorm whose output only feeds Linear layers scales its
    per-channel weight and bias by ``f`` and those layers' input columns by ``1 / f`` (the
    norm's input, a residual stream, is untouched)."""
    from netpress.errors import ModelError
    from netpress.export.graph import trace

    try:
        gm = trace(model)
    except ModelError:
        return []
    sets = []
    for node in gm.graph.nodes:
        norm = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None or \
                len(norm.normalized_shape) != 1:
            continue
        users = list(node.users)
        if users and all(u.op == "call_module" and isinstance(
                gm.get_submodule(str(u.target)), nn.Linear) for u in users):
            per_unit = [np.array([c]) for c in range(norm.weight.numel())]
            sets.append(ScaleSet(f"{node.target} (norm)", len(per_unit),
                                 {str(node.target): per_unit},
                                 {str(u.target): per_unit for u in users}))
    return sets


@torch.no_grad()
def apply_scales(model: nn.Module, scale_set: ScaleSet, factors: torch.Tensor) -> None:
    """Scale ``scale_set``'s producer rows by ``factors`` (one per unit) and divide its
    consumer columns by them, in place."""
    for table, divide in ((scale_set.rows, False), (scale_set.cols, True)):
        for name, per_unit in table.items():
            layer = model.get_submodule(name)
            assert isinstance(layer, (*_LAYERS, nn.LayerNorm)) and layer.weight is not None
            f = torch.ones(layer.weight.shape[1 if divide else 0], dtype=torch.float64)
            for u, pos in enumerate(per_unit):
                f[torch.as_tensor(pos, dtype=torch.long)] = float(factors[u])
            shape = [1] * layer.weight.dim()
            shape[1 if divide else 0] = -1
            scale = (1.0 / f if divide else f).reshape(shape)
            layer.weight.copy_((layer.weight.double() * scale).to(layer.weight.dtype))
            if not divide and layer.bias is not None:
                layer.bias.copy_((layer.bias.double() * f).to(layer.bias.dtype))


def _pick(f_all: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    return f_all[torch.where(unit >= 0, unit, f_all.numel() - 1)]


def quantization_noise(log_f: torch.Tensor, locations: list[Location],
                       consumers: list[Consumer], *, act_levels: int = 255,
                       weight_qmax: int = 127) -> torch.Tensor:
    """The first-order output noise of per-tensor activation quantization plus the weight
    rounding of the layers reading scaled columns, for factors ``exp(log_f)`` (one per unit;
    channels of unit -1 keep 1). Differentiable in ``log_f``."""
    f_all = torch.cat([log_f.exp(), log_f.new_ones(1)])
    total = log_f.new_zeros(())
    for loc in locations:
        f = _pick(f_all, loc.unit)
        hi = (f * loc.hi).max().clamp(min=0)
        lo = (f * loc.lo).min().clamp(max=0)
        step = (hi - lo) / act_levels
        total = total + step.pow(2) / 12 * (loc.grad2 / f.pow(2)).sum()
    for con in consumers:
        f = _pick(f_all, con.unit)
        step_o = (con.wmax / f).amax(1) / weight_qmax
        if con.pairs is not None:
            fp = _pick(f_all, con.pairs.unit)
            sums = torch.maximum((con.pairs.pos / fp).sum(-1), (con.pairs.neg / fp).sum(-1))
            step_o = torch.maximum(step_o, sums.amax(1) / (con.pairs.limit - 1))
        total = total + (step_o.pow(2) / 12 * con.out_grad2).sum() * \
            (f.pow(2) * con.in_power).sum()
    return total


def optimal_factors(units: int, locations: list[Location], consumers: list[Consumer], *,
                    steps: int = 300, lr: float = 0.05,
                    max_factor: float = MAX_FACTOR) -> tuple[torch.Tensor, float, float]:
    """Factors minimising :func:`quantization_noise` (Adam on ``log f`` within
    ``[1 / max_factor, max_factor]``); returns ``(factors, noise before, noise after)``."""
    log_f = torch.zeros(units, dtype=torch.float64, requires_grad=True)
    bound = math.log(max_factor)
    with torch.no_grad():
        before = float(quantization_noise(log_f, locations, consumers))
    opt = torch.optim.Adam([log_f], lr=lr)
    best, best_f = before, log_f.detach().clone()
    for _ in range(steps):
        opt.zero_grad()
        with torch.enable_grad():
            loss = quantization_noise(log_f, locations, consumers)
            if float(loss.detach()) < best:
                best, best_f = float(loss.detach()), log_f.detach().clone()
            loss.backward()
        opt.step()
        with torch.no_grad():
            log_f.clamp_(-bound, bound)
    return best_f.exp(), before, best
