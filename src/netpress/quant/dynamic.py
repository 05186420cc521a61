"""Dynamic INT8 for transformers: ``DynamicQuantize()``.

Linear layers keep int8 weights (symmetric, per output channel) and quantize their input at
run time, per tensor, to uint8 exactly as ONNX's ``DynamicQuantizeLinear`` does
(:func:`dynamic_qparams`): no calibration data, and no graph tracing (the layers are swapped
module by module, so models torch.fx cannot trace, such as ``transformers`` encoders, work).
Embedding tables become int8 rows with a per-row scale (:mod:`netpress.quant.embedding`;
a table tied to a quantized output layer reads that layer's codes).

Exported with :func:`netpress.export.onnx.export_onnx`, a layer is
``DynamicQuantizeLinear → MatMulInteger → Cast → Mul(x_scale · w_scale) → Add(bias)``, the
pattern ONNX Runtime fuses into its integer ``DynamicQuantizeMatMul`` kernel, and an
embedding is ``Gather(int8 table) → Cast → Mul(Gather(scales))``. The PyTorch forward computes
what those ops compute (up to float summation order).

The weights obey the INT8 target's rules (:mod:`netpress.quant.target`): on ``x86-avx2`` the
uint8 × int8 kernels add pairs of products in 16 bits with saturation, so the codes are made
pair-safe there (a larger scale where needed, then the pair limit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netpress._inputs import call_model, move_to, real_tokens, token_mask
from netpress.config import MethodConfig
from netpress.context import Context
from netpress.data import batches
from netpress.errors import ModelError, RecipeError
from netpress.export.modules import register_module_type
from netpress.measure.collect import evaluating, model_device
from netpress.quant.embedding import QuantEmbedding, int8_row_codes
from netpress.quant.lookup import scaled_lookup
from netpress.quant.target import (
    TARGET_CHOICES,
    TARGETS,
    apply_weight_rule,
    min_weight_scale,
    resolve_target,
)
from netpress.registry import register
from netpress.select import check_patterns, select_names

__all__ = ["DynamicQuantize", "DynamicQuantLinear", "QuantEmbedding", "dynamic_qparams",
           "quantize_activation", "dynamic_linear", "int8_weight_codes", "int8_row_codes",
           "input_amax", "outlier_scale", "dynamic_quantize"]


def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of ONNX ``DynamicQuantizeLinear`` for the whole tensor ``x``:
    the range ``[min(x, 0), max(x, 0)]`` over 255 steps, the zero point
    ``round_half_even(-min / scale)`` in ``[0, 255]`` (scale 1 for an all-zero tensor)."""
    lo = torch.clamp(x.detach().min().float(), max=0.0)
    hi = torch.clamp(x.detach().max().float(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, 255)
    return scale, zero


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` as uint8 codes (held in a float tensor), its scale and zero point
    (:func:`dynamic_qparams`); rounding half to even, saturating to ``[0, 255]``."""
    scale, zero = dynamic_qparams(x)
    q = torch.clamp(torch.round(x.float() / scale) + zero, 0, 255)
    return q, scale, zero


def dynamic_linear(x: torch.Tensor, codes: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """What ``DynamicQuantizeLinear → MatMulInteger → Cast → Mul → Add`` computes for a
    Linear with int8 ``codes`` ``[out, in]`` and per-output ``weight_scale``:
    ``((q - z) @ codesᵀ) · (s · weight_scale) + bias``."""
    q, s, z = quantize_activation(x)
    acc = F.linear(q - z, codes.to(q.dtype))  # integers: exact while |sums| < 2**24
    y = acc * (s * weight_scale.float())
    return y if bias is None else y + bias


def int8_weight_codes(weight: torch.Tensor, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 ``(codes, scale)`` of a Linear ``weight`` for the
    INT8 ``target`` (the smallest scale its rule allows, then the rule applied)."""
    w = weight.detach().float()
    scale = torch.maximum(w.abs().amax(1) / 127.0, min_weight_scale(w, target))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / scale[:, None]).clamp(-127, 127)
    return apply_weight_rule(codes, target).to(torch.int8), scale


class _DynamicMatMul(torch.autograd.Function):
    """The integer Linear, exported as ONNX Runtime's dynamic-quantization pattern."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        return dynamic_linear(x, codes, scale, bias)

    @staticmethod
    def symbolic(g: Any, x: Any, codes: Any, scale: Any, bias: Any) -> Any:
        q, s, z = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("MatMulInteger", q, g.op("Transpose", codes, perm_i=[1, 0]), z)
        y = g.op("Mul", g.op("Cast", acc, to_i=1), g.op("Mul", s, scale))  # 1: FLOAT
        return g.op("Add", y, bias)


class DynamicQuantLinear(nn.Module):
    """A Linear with int8 weights whose input is quantized at run time (module docs).

    With ``in_scale`` set (a per-input-channel factor, 1 except on the outlier channels
    found on calibration data), the input is multiplied by it before the quantizer and the
    weight columns were divided by it before rounding: the outlier channels shrink into the
    range of the others, so the per-tensor step is finer for all of them (SmoothQuant's
    migration, Xiao et al. 2023, limited to the outlier channels and applied at run time
    because a post-LayerNorm residual stream cannot absorb it).
    """

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    in_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 target: str | None = None, smoothed: bool = False) -> None:
        super().__init__()
        if target is not None and target not in TARGETS:
            raise ValueError(f"target={target!r} is not one of {TARGETS}")
        self.in_features, self.out_features, self.target = in_features, out_features, target
        self.smoothed = smoothed
        self.register_buffer("weight_q", torch.zeros(out_features, in_features,
                                                     dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("in_scale", torch.ones(in_features if smoothed else 0))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, target: str,
                   in_scale: torch.Tensor | None = None) -> DynamicQuantLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, target,
                smoothed=in_scale is not None)
        w = linear.weight.detach().float().cpu()
        with torch.no_grad():
            if in_scale is not None:
                q.in_scale.copy_(in_scale)
                w = w / in_scale.float().cpu()
            codes, scale = int8_weight_codes(w, target)
            q.weight_q.copy_(codes)
            q.weight_scale.copy_(scale)
            if linear.bias is not None and q.bias is not None:
                q.bias.copy_(linear.bias.detach())
        return q.to(linear.weight.device)

    bits = 8  #: the width of the weight codes (read by netpress.measure.size)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the layer stands for, out × in: codes times scales, times
        ``in_scale`` where the codes hold the smoothed weight ``W / in_scale``. The size
        accounting (:mod:`netpress.measure.size`) counts these weights through it."""
        w = self.weight_q.float() * self.weight_scale.float()[:, None]
        return w * self.in_scale.float()[None, :] if self.smoothed else w

    @property
    def weight(self) -> torch.Tensor:
        """:meth:`dequantized_weight`, read-only: model code that reads ``layer.weight``
        (its dtype or device) keeps working. The forward pass does not use it."""
        return self.dequantized_weight()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in _linear_spec(self).items())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.bias is not None else x.new_zeros(self.out_features)
        if self.smoothed:
            x = x * self.in_scale
        if torch.onnx.is_in_onnx_export():
            y = _DynamicMatMul.apply(x, self.weight_q, self.weight_scale, bias)
            assert isinstance(y, torch.Tensor)
            return y
        return dynamic_linear(x, self.weight_q, self.weight_scale, bias).to(x.dtype)


def _linear_spec(m: nn.Module) -> dict[str, Any]:
    assert isinstance(m, DynamicQuantLinear)
    return {"in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "target": m.target, "smoothed": m.smoothed}


register_module_type(DynamicQuantLinear, _linear_spec, DynamicQuantLinear,
                     name="netpress.DynamicQuantLinear")


@dataclass(frozen=True, kw_only=True)
class DynamicQuantize(MethodConfig):
    """INT8 weights and run-time (dynamic, per-tensor uint8) activations for Linear layers,
    int8 rows for embedding tables (see the module docs). No calibration data.

    ``layers`` / ``ignore``: full module names or ``re:`` patterns of the Linear and
    Embedding layers to quantize. ``embeddings``: quantize embedding tables too.
    ``outlier_channels``: per Linear, the input channels of largest magnitude on the
    calibration data (at most ``calibration_batches`` batches) that are scaled down into
    the others' range (see :class:`DynamicQuantLinear`), in the Linear layers
    ``outlier_layers`` selects whose range this shrinks at least ``outlier_gain`` times;
    with ``outlier_channels=0`` no calibration data is needed. ``target``: the CPU
    the integer model will run on (``auto``: this one; see :mod:`netpress.quant.target`).
    """

    layers: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = ()
    embeddings: bool = True
    outlier_channels: int = 8
    outlier_layers: tuple[str, ...] = ("re:.*",)
    outlier_gain: float = 2.5
    calibration_batches: int = 8
    target: str = "auto"

    def __post_init__(self) -> None:
        n = self.type_name()
        if self.target not in TARGET_CHOICES:
            raise RecipeError(f"{n}: target={self.target!r}; choose one of {TARGET_CHOICES}")
        if not isinstance(self.embeddings, bool):
            raise RecipeError(f"{n}: embeddings must be true or false")
        check_patterns(n, layers=self.layers, ignore=self.ignore)
        check_patterns(n, outlier_layers=self.outlier_layers)
        if isinstance(self.outlier_gain, bool) or not isinstance(
                self.outlier_gain, (int, float)) or not self.outlier_gain >= 1:
            raise RecipeError(f"{n}: outlier_gain={self.outlier_gain!r} must be a number >= 1")
        for key, low in (("outlier_channels", 0), ("calibration_batches", 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise RecipeError(f"{n}: {key}={v!r} must be an int >= {low}")


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def outlier_scale(amax: torch.Tensor, channels: int, min_gain: float) -> torch.Tensor | None:
    """Per-channel input factors that bring the ``channels`` largest of ``amax`` (the
    largest ``|x|`` per channel) down to the next largest, 1 elsewhere; None when that
    shrinks the range by less than ``min_gain`` (the layer is then left unscaled)."""
    if channels <= 0 or channels >= amax.numel():
        return None
    top = amax.float().sort(descending=True).values
    if float(top[channels]) <= 0 or float(top[0] / top[channels]) < min_gain:
        return None
    return torch.clamp(top[channels] / amax.float().clamp_min(1e-30), max=1.0)


def input_amax(model: nn.Module, names: list[str], data: list[Any]) -> dict[str, torch.Tensor]:
    """Per input channel, the largest ``|x|`` each named layer reads over ``data`` (at the
    real tokens of text batches: padding positions are left out)."""
    amax: dict[str, torch.Tensor] = {}
    keep: list[torch.Tensor | None] = [None]  # the current batch's real tokens

    def hook(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = real_tokens(args[0].detach(), keep[0]).abs().float()
            a = x.reshape(-1, x.shape[-1]).amax(0).cpu()
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with evaluating(model), torch.no_grad():
            for x in data:
                keep[0] = token_mask(x)
                call_model(model, x)
    finally:
        for h in handles:
            h.remove()
    return amax


def dynamic_quantize(model: nn.Module, cfg: DynamicQuantize,
                     data: list[Any] | None = None) -> tuple[nn.Module, list[str]]:
    """Swap ``model``'s selected Linear / Embedding layers in place (the outlier channels
    from the calibration batches ``data``); returns the model and the names swapped."""
    kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding) if cfg.embeddings \
        else (nn.Linear,)
    candidates = [n for n, m in model.named_modules() if type(m) in kinds
                  or (cfg.embeddings and type(m) is not nn.Embedding and scaled_lookup(m))]
    if not candidates:
        from netpress.measure.size import is_coded

        coded = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
                 if n and is_coded(m)]
        raise ModelError("DynamicQuantize: the model has no float nn.Linear"
                         + (" or nn.Embedding" if cfg.embeddings else "") + " layer"
                         + (f"; its layers are quantized already, e.g. {coded[:3]}: leave "
                            "DynamicQuantize out, or put it before the step that quantized "
                            "them" if coded else ""))
    names = select_names(candidates, cfg.layers, cfg.ignore, owner=cfg.type_name())
    linears = [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
    amax: dict[str, torch.Tensor] = {}
    if cfg.outlier_channels and data:
        chosen = select_names(linears, cfg.outlier_layers, (), owner=cfg.type_name(),
                              what="outlier layer")
        amax = input_amax(model, chosen, data)
    target = resolve_target(cfg.target)
    tied = _tied_tables(model, names)
    shared: dict[tuple[float, ...], DynamicQuantLinear] = {}
    for name in names:
        layer = model.get_submodule(name)
        if name in tied:
            continue  # after the Linear it reads
        if isinstance(layer, nn.Linear):
            a = amax.get(name)
            factor = None if a is None else outlier_scale(a, cfg.outlier_channels,
                                                          cfg.outlier_gain)
            new: nn.Module = DynamicQuantLinear.from_float(layer, target, factor)
            if factor is not None:
                _share_scale(new, shared)
        else:
            assert isinstance(layer, nn.Embedding)
            new = QuantEmbedding.from_float(layer)
        _set(model, name, new)
    for table, linear in tied.items():
        source, emb = model.get_submodule(linear), model.get_submodule(table)
        assert isinstance(source, DynamicQuantLinear) and isinstance(emb, nn.Embedding)
        _set(model, table, QuantEmbedding.tied_to(source, emb))
    return model, names


def _tied_tables(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Selected embedding tables whose weight is a selected Linear's too (a tied output
    layer): table -> that Linear."""
    linears = {id(m.weight): n for n in names
               if isinstance(m := model.get_submodule(n), nn.Linear)}
    out = {}
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, nn.Embedding) and id(m.weight) in linears and m.max_norm is None:
            out[n] = linears[id(m.weight)]
    return out


def _share_scale(layer: nn.Module, shared: dict[tuple[float, ...], DynamicQuantLinear]) -> None:
    """Layers with equal ``in_scale`` share the tensor: layers reading one input (query,
    key, value) then export one scaled input, which ONNX Runtime quantizes once."""
    assert isinstance(layer, DynamicQuantLinear)
    first = shared.setdefault(tuple(layer.in_scale.tolist()), layer)
    if first is not layer:
        layer.in_scale = first.in_scale


def _needs(cfg: DynamicQuantize) -> tuple[str, ...]:
    return ("calibration",) if cfg.outlier_channels else ()


@register(DynamicQuantize, kind="quantize", needs=_needs)
def _apply(model: nn.Module, cfg: DynamicQuantize, ctx: Context) -> nn.Module:
    from netpress.quant.ptq import drop_masks

    data = None
    if cfg.outlier_channels:
        source = ctx.require("calibration", by=cfg.type_name())
        device = model_device(model)
        data = [move_to(b, device) for i, (b, _) in
                enumerate(batches(source, name="calibration")) if i < cfg.calibration_batches]
    _, names = dynamic_quantize(model, cfg, data)
    drop_masks(model, ctx)
    ctx.record(cfg.type_name(), layers=len(names), target=resolve_target(cfg.target),
               outlier_channels=cfg.outlier_channels)
    return model
