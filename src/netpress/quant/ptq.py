"""Post-training quantization: ``Quantize(weights=8, activations=8)``.

The EHAP recipe by default: BatchNorm folded into the preceding layers, weights symmetric
per output channel (int8, or a per-layer bit width), activations asymmetric per tensor
(uint8) with ranges from a calibration pass, and empirical bias correction (Nagel et al.
2019): the mean output shift each layer's weight quantization causes on the calibration data
is subtracted from its bias. With activations quantized the model becomes a ``torch.fx``
graph with :class:`~netpress.quant.modules.ActQuant` nodes placed as
:mod:`netpress.quant._insert` describes; :func:`netpress.export.onnx.export_onnx` turns it
into a QDQ ONNX model that ONNX Runtime runs with integer kernels.

Layer types the quantizer does not support stay float, with a warning that lists them, or an
error with ``require_full_coverage=True``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from netpress._inputs import call_model, move_to
from netpress.config import MethodConfig
from netpress.context import Context
from netpress.data import batches
from netpress.errors import ModelError, RecipeError
from netpress.quant._equalize_stats import equalize
from netpress.quant._insert import (
    drop_identities,
    feeding_quant,
    insert_act_quant,
    remove_unused,
)
from netpress.quant.fold import fold_batchnorm
from netpress.quant.input_grid import apply_input_grid
from netpress.quant.modules import QUANT_LAYERS, ActQuant, QuantWeight, quantize_layer
from netpress.quant.observers import (
    OBSERVERS,
    calibration_batch,
    make_observer,
    mse_range,
    observed_rows,
)
from netpress.quant.primitives import (
    MAX_BITS,
    MIN_BITS,
    choose_qparams,
    minmax,
    quantize_affine,
)
from netpress.quant.ranges import choose_ranges
from netpress.quant.target import (
    TARGET_CHOICES,
    apply_weight_rule,
    depthwise_layer,
    min_weight_scale,
    resolve_target,
)
from netpress.registry import register
from netpress.select import check_patterns, resolve_per_layer, select_names

__all__ = ["QuantSettings", "Quantize", "weight_scale", "WeightRounding", "round_to_nearest",
           "quantize_weights", "integer_layers", "prepare", "quantize_model", "bias_on_grid",
           "drop_masks"]

_WEIGHT_OBSERVERS = ("minmax", "mse")


def _check_bits(owner: str, name: str, bits: Any) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise RecipeError(f"{owner}: {name}={bits!r} must be an int in [{MIN_BITS}, {MAX_BITS}]")


@dataclass(frozen=True, kw_only=True)
class QuantSettings(MethodConfig):
    """Settings shared by :class:`Quantize` and ``QAT`` (a base class, not a method)."""

    weights: int = 8
    activations: int | None = 8
    observer: str = "minmax"
    layers: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = ()
    per_layer: Mapping[str, int] = field(default_factory=dict)
    fold_bn: bool = True
    require_full_coverage: bool = False
    calibration_batches: int | None = None
    target: str = "auto"
    input_grid: bool = True
    equalize: bool = True
    range_search: bool = True

    def _check_quant(self) -> None:
        n = self.type_name()
        if self.target not in TARGET_CHOICES:
            raise RecipeError(f"{n}: target={self.target!r}; choose one of {TARGET_CHOICES} "
                              "(the CPU the INT8 model will run on; 'auto' = this one)")
        _check_bits(n, "weights", self.weights)
        if self.activations is not None:
            _check_bits(n, "activations", self.activations)
        for key, bits in self.per_layer.items():
            _check_bits(n, f"per_layer[{key!r}]", bits)
        if self.observer not in OBSERVERS:
            raise RecipeError(f"{n}: observer={self.observer!r}; choose one of "
                              f"{sorted(OBSERVERS)}")
        check_patterns(n, layers=self.layers, ignore=self.ignore)
        if self.calibration_batches is not None and (
                not isinstance(self.calibration_batches, int) or self.calibration_batches < 1):
            raise RecipeError(f"{n}: calibration_batches must be an int >= 1 or null")


@dataclass(frozen=True, kw_only=True)
class Quantize(QuantSettings):
    """Post-training quantization: per-channel symmetric weights, per-tensor uint8 activations.

    ``weights`` is the default weight bit width and ``per_layer`` maps layer names or ``re:``
    patterns to their own; ``activations=None`` quantizes weights only. ``observer`` picks
    the activation ranges (minmax, moving_average, percentile, mse, entropy) and
    ``weight_observer`` the weight ranges (minmax or mse). ``calibration_batches`` caps the
    calibration pass. Calibration data is required unless ``activations=None``; weight-only
    quantization uses it, when given, for bias correction. ``target`` is the CPU the integer
    model will run on (``auto``: this one; ``x86-vnni``, ``x86-avx2``, ``arm64``, ``generic``;
    see :mod:`netpress.quant.target`): the weights of layers that run as integer kernels are
    shaped so that its kernels compute exactly what the fake-quant model computes.
    ``range_search`` (default) clips each activation range where that moves the top-1
    margins least (:mod:`netpress.quant.ranges`); ``False`` keeps the observer's ranges.
    ``input_grid`` quantizes 8-bit image inputs losslessly and ``equalize`` rescales
    coupled channels before calibration (see their modules).
    ``rounding``: ``nearest``, or ``gptq`` (needs calibration data): the weights are rounded
    to the same grid with GPTQ's error compensation
    (:mod:`netpress.reconstruct.rounding`).
    """

    weight_observer: str = "minmax"
    bias_correction: bool = True
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        self._check_quant()
        if self.weight_observer not in _WEIGHT_OBSERVERS:
            raise RecipeError(f"{self.type_name()}: weight_observer={self.weight_observer!r}; "
                              f"choose one of {_WEIGHT_OBSERVERS}")
        if self.rounding not in ("nearest", "gptq"):
            raise RecipeError(f"{self.type_name()}: rounding={self.rounding!r}; choose "
                              f"'nearest' or 'gptq'")


def weight_scale(weight: torch.Tensor, bits: int, observer: str = "minmax") -> torch.Tensor:
    """Per-output-channel symmetric scales of ``weight`` (``minmax`` or ``mse`` clipping)."""
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    if observer == "mse":
        lo, hi = mse_range(rows, bits, symmetric=True)
    else:
        lo, hi = minmax(rows, axis=0)
    return choose_qparams(lo, hi, bits, symmetric=True)[0]


WeightRounding = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``(float weight, per-channel scales, bits) -> integer codes``: the replaceable rounding."""


def round_to_nearest(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``weight`` on the symmetric per-output-channel grid ``scale`` (nearest)."""
    zp = torch.zeros_like(scale, dtype=torch.int32)
    return quantize_affine(weight.detach().float(), scale, zp, bits, symmetric=True, axis=0)


def quantize_weights(layer: nn.Module, bits: int, scale: torch.Tensor, *,
                     target: str | None = None,
                     rounding: WeightRounding = round_to_nearest) -> QuantWeight:
    """The quantized counterpart of a Conv2d/Linear ``layer``, its weights rounded by
    ``rounding`` on the grid ``scale``.

    With a ``target`` (for a layer that runs as an integer kernel) the scales are first
    widened where the target's rule needs it and the codes then made to obey the rule
    (:func:`netpress.quant.target.apply_weight_rule`, a no-op for round-to-nearest codes).
    """
    assert isinstance(layer, (nn.Conv2d, nn.Linear))
    depthwise = depthwise_layer(layer)
    if target is not None:
        scale = torch.maximum(scale, min_weight_scale(layer.weight, target,
                                                      depthwise=depthwise).to(scale))
    codes = rounding(layer.weight.detach(), scale, bits)
    if target is not None:
        codes = apply_weight_rule(codes, target, depthwise=depthwise)
    return quantize_layer(layer, bits, scale, codes=codes, target=target)


def integer_layers(gm: nn.Module, names: list[str]) -> list[str]:
    """The layers among ``names`` whose input is quantized (they run as integer kernels)."""
    if not isinstance(gm, fx.GraphModule):
        return []
    return [n for n in names if feeding_quant(gm, n) is not None]


def _own_params(m: nn.Module) -> bool:
    return any(p.is_floating_point() for p in m.parameters(recurse=False))


def _plan(model: nn.Module, cfg: QuantSettings) -> dict[str, int]:
    """Bits for each selected supported layer; warns about (or refuses) unsupported ones."""
    candidates = [n for n, m in model.named_modules() if n and _own_params(m)]
    if not candidates:
        raise ModelError(f"{cfg.type_name()}: the model has no layers with parameters")
    chosen = select_names(candidates, cfg.layers, cfg.ignore, owner=cfg.type_name())
    supported = [n for n in chosen if type(model.get_submodule(n)) in QUANT_LAYERS]
    unsupported = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in chosen
                   if n not in supported]
    if unsupported:
        msg = (f"{cfg.type_name()}: {len(unsupported)} layer(s) of types the quantizer does "
               f"not support stay in float: {', '.join(unsupported)}")
        if cfg.require_full_coverage:
            raise ModelError(msg + " (require_full_coverage=True)")
        warnings.warn(msg, stacklevel=3)
    if not supported:
        raise ModelError(f"{cfg.type_name()}: none of the selected layers is a Conv2d or "
                         "Linear, so nothing would be quantized")
    return resolve_per_layer(supported, cfg.per_layer, cfg.weights, owner=cfg.type_name())


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _calibrate(model: nn.Module, ctx: Context, limit: int | None) -> int:
    seen = 0
    with torch.no_grad():
        for i, (inputs, _) in enumerate(batches(ctx.require("calibration", "Quantize"),
                                                name="calibration")):
            if limit is not None and i >= limit:
                break
            inputs = move_to(inputs, ctx.device)
            with calibration_batch(inputs):  # observers and bias sums skip padding tokens
                call_model(model, inputs)
            seen += 1
    return seen


def _correct_biases(model: nn.Module, floats: Mapping[str, nn.Module], ctx: Context,
                    limit: int | None) -> None:
    """Subtract each layer's mean output shift due to weight quantization (per channel)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, ref in floats.items():
        q = model.get_submodule(name)

        def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor, name: str = name,
                 ref: nn.Module = ref) -> None:
            delta = observed_rows(out - ref(args[0]))
            cdim = 1 if isinstance(ref, nn.Conv2d) else delta.dim() - 1
            dims = [d for d in range(delta.dim()) if d != cdim]
            total = delta.sum(dims).double()
            sums[name] = sums[name] + total if name in sums else total
            counts[name] = counts.get(name, 0) + delta.numel() // delta.shape[cdim]

        hooks.append(q.register_forward_hook(hook))
    try:
        _calibrate(model, ctx, limit)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for name, total in sums.items():
            q = model.get_submodule(name)
            assert isinstance(q, QuantWeight)
            shift = (total / max(1, counts[name])).float()
            if q.bias is None:
                q.bias = nn.Parameter(-shift)
            else:
                q.bias.sub_(shift)


@torch.no_grad()
def bias_on_grid(gm: nn.Module, names: list[str]) -> None:
    """Round biases to the int32 grid ``input_scale * weight_scale`` an integer kernel uses."""
    if not isinstance(gm, fx.GraphModule):
        return
    for name in names:
        layer = gm.get_submodule(name)
        aq = feeding_quant(gm, name)
        if aq is None or not isinstance(layer, QuantWeight) or layer.bias is None:
            continue
        step = aq.scale * layer.weight_scale
        layer.bias.copy_(torch.round(layer.bias / step) * step)


def _calibration_data(ctx: Context, owner: str) -> Context:
    """``ctx`` itself, or a view of it whose calibration data is the train data."""
    if ctx.calibration is not None:
        return ctx
    if ctx.train is None:
        ctx.require("calibration", owner)
    return dataclasses.replace(ctx, calibration=ctx.train)


def prepare(model: nn.Module, cfg: QuantSettings, ctx: Context,
            ) -> tuple[nn.Module, dict[str, int], list[str], dict[str, Any]]:
    """Fold BN, plan the layers, equalize, insert and calibrate activation quantizers.

    Returns ``(model or its graph, bits by layer, activation quantizer names, notes for the
    report)``; the layers themselves are still float.
    """
    model.eval()
    folded = fold_batchnorm(model) if cfg.fold_bn else []
    plan = _plan(model, cfg)
    notes: dict[str, Any] = {"folded_batchnorms": len(folded)}
    if cfg.activations is None:
        return model, plan, [], notes
    from netpress.export.graph import trace

    calib_ctx = _calibration_data(ctx, cfg.type_name())
    try:
        if cfg.equalize:
            inputs = _calibration_inputs(calib_ctx, cfg.calibration_batches)
            notes["equalization"] = _rounded(equalize(model, inputs, list(plan),
                                                      target=resolve_target(cfg.target)))
        target = trace(model)
    except ModelError as exc:
        if "cannot trace" not in str(exc):
            raise
        raise ModelError(f"{cfg.type_name()}: static activation quantization needs a model "
                         f"torch.fx can trace ({exc}). Use npr.DynamicQuantize() for INT8 "
                         "activations without tracing (quantized at run time, layer by "
                         "layer: transformers models), or activations=None for weights "
                         "only") from None
    drop_identities(target)
    acts = insert_act_quant(target, lambda n: n in plan, bits=cfg.activations)
    for name in acts:
        aq = target.get_submodule(name)
        assert isinstance(aq, ActQuant)
        aq.observer = make_observer(cfg.observer)
    if _calibrate(target, calib_ctx, cfg.calibration_batches) == 0:
        raise ModelError(f"{cfg.type_name()}: the calibration data holds no batches")
    acts = sorted(set(acts) - set(remove_unused(target)))
    for name in acts:
        aq = target.get_submodule(name)
        assert isinstance(aq, ActQuant)
        aq.freeze()
    if cfg.range_search:
        chosen = choose_ranges(target, acts, _calibration_inputs(calib_ctx,
                                                                 cfg.calibration_batches))
        notes["range_search"] = {"clipped": sum(r < 1.0 for r in chosen.values()),
                                 "quantizers": len(chosen)}
    if cfg.input_grid:
        xs = [x for x in _calibration_inputs(calib_ctx, cfg.calibration_batches)
              if isinstance(x, torch.Tensor)]
        notes["input_grid"] = bool(xs) and apply_input_grid(target, torch.cat(xs))
    return target, plan, acts, notes


def _calibration_inputs(ctx: Context, limit: int | None) -> list[Any]:
    """The model inputs of the calibration batches (at most ``limit``), on ``ctx.device``."""
    return [move_to(inputs, ctx.device) for i, (inputs, _) in enumerate(
        batches(ctx.require("calibration", "Quantize"), name="calibration"))
        if limit is None or i < limit]


def _rounded(info: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in info.items()}


def quantize_model(model: nn.Module, cfg: Quantize, ctx: Context) -> nn.Module:
    """Quantize ``model`` (eval mode, modified in place where possible); the quantized model."""
    target, plan, acts, notes = prepare(model, cfg, ctx)
    floats = {n: target.get_submodule(n) for n in plan}
    cpu = resolve_target(cfg.target)
    integer = set(integer_layers(target, list(plan)))
    roundings: Mapping[str, WeightRounding] = {}
    if cfg.rounding == "gptq":
        from netpress.reconstruct.rounding import gptq_roundings  # reconstruct imports quant

        roundings = gptq_roundings(target, list(plan), ctx.require("calibration", "Quantize"),
                                   max_batches=cfg.calibration_batches)
    for name, bits in plan.items():
        layer = target.get_submodule(name)
        assert isinstance(layer, (nn.Conv2d, nn.Linear))
        _set_module(target, name, quantize_weights(
            layer, bits, weight_scale(layer.weight, bits, cfg.weight_observer),
            target=cpu if name in integer else None,
            rounding=roundings.get(name, round_to_nearest)))
    corrected = cfg.bias_correction and ctx.calibration is not None
    if corrected:
        _correct_biases(target, floats, ctx, cfg.calibration_batches)
    bias_on_grid(target, list(plan))
    ctx.record(cfg.type_name(), layers=len(plan), **notes,
               activation_quantizers=len(acts), bias_correction=corrected,
               target=cpu, target_requested=cfg.target, integer_layers=len(integer),
               **({"gptq_rounded": len(roundings)} if cfg.rounding == "gptq" else {}),
               bits={str(b): sum(1 for v in plan.values() if v == b) for b in
                     sorted(set(plan.values()))})
    return target.eval()


def drop_masks(model: nn.Module, ctx: Context) -> None:
    """Forget pruning masks of weights that became integer codes (their zeros stay zero)."""
    for key in [k for k in ctx.masks if k.endswith(".weight")]:
        try:
            model.get_parameter(key)
        except AttributeError:
            del ctx.masks[key]


def quantize_needs(cfg: Quantize) -> tuple[str, ...]:
    """Calibration data is needed for activation ranges; weight-only runs without it
    (bias correction then runs only when calibration data is given)."""
    return ("calibration",) if cfg.activations is not None or cfg.rounding == "gptq" else ()


@register(Quantize, kind="quantize", needs=quantize_needs)
def _apply_quantize(model: nn.Module, cfg: Quantize, ctx: Context) -> nn.Module:
    if ctx.schedules:
        raise RecipeError(f"{cfg.type_name()}: a gradual pruning ramp is still open; put its "
                          "recovery step before Quantize")
    quantized = quantize_model(model, cfg, ctx)
    drop_masks(quantized, ctx)
    return quantized
