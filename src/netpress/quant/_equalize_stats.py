"""Statistics for :mod:`netpress.quant.equalize`, gathered on a scratch quantizer graph, and
the ``equalize`` driver that ``Quantize`` calls on the BatchNorm-folded float model.

The scratch copy gets its activation quantizers placed exactly as ``Quantize`` will place
them, but they only observe; calibration batches then run forward and backward. The backward
signal is the reference's top-1 minus top-2 logit for classifier outputs (so the noise model
weighs what flips predictions), or a fixed random projection of the outputs otherwise (whose
expected square is the output noise energy).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from netpress._inputs import _tensors, call_model, primary_output, token_mask
from netpress.errors import ModelError
from netpress.quant._insert import drop_identities, insert_act_quant
from netpress.quant.equalize import (
    Consumer,
    Location,
    Pairs,
    ScaleSet,
    apply_scales,
    coupled_sets,
    kernel_pairs,
    optimal_factors,
)
from netpress.quant.modules import ActQuant
from netpress.quant.observers import MinMaxObserver, zero_padding
from netpress.quant.target import WEIGHT_RULES, depthwise_layer

__all__ = ["equalize"]

_KEEP_CHANNELS_FNS: set[object] = {F.relu, torch.relu, F.adaptive_avg_pool2d, F.avg_pool2d,
                                   F.max_pool2d, torch.flatten}
_KEEP_CHANNELS_MODULES = (nn.ReLU, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d,
                          nn.Flatten, ActQuant)


def _unit_maps(sets: Sequence[ScaleSet], model: nn.Module,
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Global unit index of each layer's rows and input columns (-1: not scaled)."""
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    base = 0
    for s in sets:
        for table, out, dim in ((s.rows, rows, 0), (s.cols, cols, 1)):
            for name, per_unit in table.items():
                w = _weight(model, name)
                m = out.setdefault(name, torch.full((int(w.shape[dim]),), -1,
                                                    dtype=torch.long))
                for u, pos in enumerate(per_unit):
                    m[torch.as_tensor(pos, dtype=torch.long)] = base + u
        base += s.units
    return rows, cols, base


def _pairs(model: nn.Module, name: str, col_unit: torch.Tensor, target: str | None,
           ) -> Pairs | None:
    """The pairs of layer ``name`` when ``target``'s rule bounds its pair sums (not for a
    depthwise conv, whose kernel adds in 32 bits)."""
    rule = WEIGHT_RULES.get(target) if target is not None else None
    layer = model.get_submodule(name)
    if rule is None or rule.pair_limit is None or depthwise_layer(layer) or \
            not isinstance(layer, (nn.Conv2d, nn.Linear)):
        return None
    return kernel_pairs(layer.weight, col_unit, rule.pair_limit)


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    layer = model.get_submodule(name)
    assert isinstance(layer, (nn.Conv2d, nn.Linear, nn.LayerNorm)) and layer.weight is not None
    return layer.weight


def _keeps_channels(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _KEEP_CHANNELS_MODULES)
    if node.op == "call_function":
        return node.target in _KEEP_CHANNELS_FNS
    return node.op == "call_method" and node.target in ("relu", "flatten")


def _reached(gm: fx.GraphModule, node: fx.Node, *,
             through_flatten: bool = True) -> Iterator[fx.Node]:
    """The nodes reading ``node``'s tensor, breadth first, followed on through ops that keep
    its channels (not through a flatten when ``through_flatten`` is False)."""
    frontier, seen = list(node.users), set()
    while frontier:
        user = frontier.pop(0)
        if user in seen:
            continue
        seen.add(user)
        yield user
        flattens = (user.op == "call_method" and user.target == "flatten") or (
            user.op == "call_module" and isinstance(gm.get_submodule(str(user.target)),
                                                    nn.Flatten))
        if _keeps_channels(gm, user) and (through_flatten or not flattens):
            frontier += list(user.users)


def _channel_units(gm: fx.GraphModule, node: fx.Node, rows: dict[str, torch.Tensor],
                   cols: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Units of the channels of the tensor ``node`` quantizes: from a layer reading it
    (through channel-preserving ops), else from the layer writing it."""
    for user in _reached(gm, node):
        if user.op == "call_module" and str(user.target) in cols:
            return cols[str(user.target)]
    src = node.args[0] if node.args else None
    if isinstance(src, fx.Node) and src.op == "call_module" and str(src.target) in rows:
        return rows[str(src.target)]
    return None


def _read_by_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the first weighted layer reading ``node``'s tensor (through ops that keep its
    layout) is a Linear: its channels are then the last dimension, also of a 3-D
    token-major tensor. A path through ``flatten`` changes the layout: conv channels."""
    for user in _reached(gm, node, through_flatten=False):
        module = gm.get_submodule(str(user.target)) if user.op == "call_module" else None
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            return isinstance(module, nn.Linear)
    return False


def _scratch(model: nn.Module, layers: Sequence[str]) -> tuple[fx.GraphModule, list[str]]:
    from netpress.export.graph import trace

    gm = trace(copy.deepcopy(model))
    drop_identities(gm)
    names = insert_act_quant(gm, lambda n: n in set(layers))
    for name in names:
        aq = gm.get_submodule(name)
        assert isinstance(aq, ActQuant)
        aq.observer = MinMaxObserver()  # an observing quantizer is the identity
    return gm, names


def _signal(out: torch.Tensor, ref_top2: torch.Tensor | None, proj: torch.Tensor | None,
            ) -> torch.Tensor:
    if ref_top2 is not None:
        return (out.gather(1, ref_top2[:, :1]) - out.gather(1, ref_top2[:, 1:])).sum()
    assert proj is not None
    return (out * proj).sum()


def _gather(gm: fx.GraphModule, aq_names: list[str], consumers: list[str],
            batches: Sequence[Any], channels_last: dict[str, bool] | None = None,
            ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]], int]:
    """Per quantizer ``[lo, hi, grad2]`` and per consumer ``[wmax, out_grad2, in_power]``;
    ``channels_last`` names the quantizers whose tensors are read by a Linear directly
    (channels in the last dimension, :func:`_read_by_linear`)."""
    channels_last = channels_last or {}
    acts: dict[str, list[torch.Tensor]] = {}
    cons: dict[str, list[torch.Tensor]] = {}
    live: list[tuple[str, str, torch.Tensor, bool]] = []
    called: set[str] = set()
    hooks = []

    def on_act(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            # a quantizer shared by pass-through ops: its first call is the tensor it rounds
            if isinstance(out, torch.Tensor) and out.requires_grad and name not in called:
                called.add(name)
                out.retain_grad()
                live.append(("act", name, out, channels_last.get(name, False)))
        return hook

    def on_layer(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            x = zero_padding(args[0].detach(), keep[0])
            conv = isinstance(m, nn.Conv2d)
            taps = m.weight[0, 0].numel() if isinstance(m, nn.Conv2d) else 1
            # a Linear reads the last dimension whatever comes before it (tokens, ...)
            dims = [d for d in range(x.dim()) if d != (1 if conv else x.dim() - 1)]
            power = x.pow(2).mean(dims) * taps * x.shape[0]  # per input, mean over positions
            _add(cons, name, 2, power)
            out.retain_grad()
            live.append(("layer", name, out, not conv))
        return hook

    keep: list[torch.Tensor | None] = [None]  # the batch's real tokens: padding is left out
    for n in aq_names:
        hooks.append(gm.get_submodule(n).register_forward_hook(on_act(n)))
    for n in consumers:
        hooks.append(gm.get_submodule(n).register_forward_hook(on_layer(n)))
    count = 0
    try:
        for i, inputs in enumerate(batches):
            live.clear()
            called.clear()
            keep[0] = token_mask(inputs)
            x = inputs.detach().requires_grad_(True) if isinstance(inputs, torch.Tensor) \
                else inputs
            out = primary_output(call_model(gm, x))  # logits of a dict / ModelOutput too
            if not out.is_floating_point():
                raise ModelError(f"Quantize: equalization needs a float output to follow, "
                                 f"the model returned {out.dtype}; pass equalize=False")
            top2 = out.detach().topk(2, 1).indices if out.dim() == 2 and out.shape[1] > 1 \
                else None
            proj = None if top2 is not None else zero_padding(torch.randn(
                out.shape, generator=torch.Generator().manual_seed(i), dtype=out.dtype), keep[0])
            _signal(out, top2, proj).backward()
            count += out.shape[0]
            for kind, name, t, last in live:
                _note(acts if kind == "act" else cons, kind, name, t, last, keep[0])
            gm.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
    return acts, cons, count


def _add(table: dict[str, list[torch.Tensor]], name: str, slot: int, v: torch.Tensor) -> None:
    entry = table.setdefault(name, [torch.zeros(0)] * 3)
    entry[slot] = v if entry[slot].numel() == 0 else entry[slot] + v


def _note(table: dict[str, list[torch.Tensor]], kind: str, name: str, t: torch.Tensor,
          channels_last: bool = False, keep: torch.Tensor | None = None) -> None:
    """Add ``t``'s per-channel statistics; its channels are dimension 1 of a conv layout
    (N × C × ...), the last one of a 2-D tensor or where ``channels_last`` (a Linear's
    token-major input or output, N × T × C). Padding positions (``keep`` False) count as 0."""
    g2 = zero_padding(t.grad.pow(2), keep) if t.grad is not None else torch.zeros_like(t)
    t = zero_padding(t, keep)
    cdim = t.dim() - 1 if channels_last or t.dim() <= 2 else 1
    dims = [d for d in range(t.dim()) if d != cdim]
    if kind == "layer":
        _add(table, name, 1, g2.sum(dims).double())
        return
    v = t.detach()
    lo, hi = v.amin(dims), v.amax(dims)
    entry = table.get(name)
    if entry is not None and entry[0].numel():
        lo, hi = torch.minimum(lo, entry[0]), torch.maximum(hi, entry[1])
    _add(table, name, 2, g2.sum(dims).double())
    table[name][0], table[name][1] = lo, hi


def _float_outputs(out: Any) -> torch.Tensor:
    """Every float tensor of a model's output (tensor, tuple, dict, ModelOutput), flattened."""
    return torch.cat([t.flatten().double() for t in _tensors(out) if t.is_floating_point()])


@torch.no_grad()
def _apply_checked(model: nn.Module, sets: Sequence[ScaleSet], factors: torch.Tensor,
                   probe: Any) -> tuple[int, int]:
    """Scale every set whose scaling keeps the outputs; ``(sets scaled, sets refused)``."""
    before = _float_outputs(call_model(model, probe))
    done = refused = base = 0
    for s in sets:
        f = factors[base:base + s.units]
        base += s.units
        if bool(((f - 1).abs() < 1e-6).all()):
            continue
        apply_scales(model, s, f)
        after = _float_outputs(call_model(model, probe))
        if float((after - before).abs().max()) > 1e-4 * max(float(before.abs().max()), 1e-6):
            apply_scales(model, s, 1.0 / f)  # a non-homogeneous op couples these channels
            refused += 1
        else:
            done += 1
    return done, refused


def equalize(model: nn.Module, batches: Sequence[Any], layers: Sequence[str], *,
             min_gain: float = 0.05, target: str | None = None) -> dict[str, Any]:
    """Equalize ``model`` (eval mode, BatchNorm folded) in place for per-tensor activation
    quantization of ``layers``' inputs, when the noise model predicts at least ``min_gain``
    less noise. ``batches`` are model inputs; ``target`` the INT8 target the weights will be
    shaped for (:mod:`netpress.quant.target`: its pair rule enters the noise model). Returns
    what was done, with the predicted noise before and after."""
    info: dict[str, Any] = {"applied": False, "sets": 0}
    sets = coupled_sets(model, batches[0]) if batches else []
    if not sets:
        return info
    rows, cols, units = _unit_maps(sets, model)
    gm, aq_names = _scratch(model, layers)
    first: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target) in aq_names:
            first.setdefault(str(node.target), node)
    consumers = [n for n in cols if n in set(layers)]
    last = {name: _read_by_linear(gm, node) for name, node in first.items()}
    with torch.enable_grad():
        acts, cons, count = _gather(gm, aq_names, consumers, batches, last)
    locations = []
    for name, (lo, hi, g2) in acts.items():
        unit = _channel_units(gm, first[name], rows, cols)
        if unit is not None and unit.numel() == lo.numel():
            locations.append(Location(unit, lo.double(), hi.double(), g2 / count))
    con_list = []
    for name in consumers:
        if name not in cons:
            continue
        w = _weight(model, name).detach().double()
        wmax = w.abs().amax(dim=tuple(range(2, w.dim()))) if w.dim() > 2 else w.abs()
        con_list.append(Consumer(cols[name], wmax, cons[name][1] / count,
                                 cons[name][2] / count, _pairs(model, name, cols[name], target)))
    factors, before, after = optimal_factors(units, locations, con_list)
    info.update(noise_before=before, noise_after=after, sets=len(sets))
    if before <= 0 or after > (1 - min_gain) * before:
        return info
    done, refused = _apply_checked(model, sets, factors, batches[0])
    info.update(applied=done > 0, sets=done, refused=refused,
                channels=int(((factors - 1).abs() > 1e-6).sum()))
    return info
