"""Quantization-aware training with learnable scales (LSQ, Esser et al. 2020).

``QAT(...)`` prepares the model as :class:`~netpress.quant.ptq.Quantize` does (BN folded,
activation quantizers placed and calibrated), then trains it in the shared recovery loop
with fake-quantized weights and activations and distillation from the reference. Rounding
uses a straight-through estimator; each scale is a parameter whose gradient is scaled by
``1 / sqrt(numel * qmax)`` as LSQ prescribes. After training the layers become the same
integer-weight modules PTQ produces, so the result saves, loads and exports the same way.
Pruning masks stay applied during training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from netpress.config import check_fraction
from netpress.context import Context
from netpress.errors import RecipeError
from netpress.quant.input_grid import lattice_quantizers
from netpress.quant.modules import ActQuant
from netpress.quant.primitives import fake_quantize, qrange
from netpress.quant.ptq import (
    QuantSettings,
    bias_on_grid,
    drop_masks,
    integer_layers,
    prepare,
    quantize_weights,
    weight_scale,
)
from netpress.quant.target import depthwise_layer, min_weight_scale, resolve_target
from netpress.recover.loop import TrainConfig, train
from netpress.recover.losses import distillation_loss
from netpress.registry import register

__all__ = ["QAT", "default_lr", "LSQConv2d", "LSQLinear", "LSQActQuant", "grad_scale"]


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``factor`` in the backward."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


class _LSQWeight:
    """Mixin: a float weight fake-quantized per output channel with a learnable scale."""

    weight: torch.Tensor
    weight_scale: nn.Parameter
    bits: int
    int8_target: str | None = None  # the INT8 target of an integer-kernel layer

    def _init_lsq(self, bits: int, scale: torch.Tensor) -> None:
        self.bits = bits
        self.weight_scale = nn.Parameter(scale.detach().clone())

    def qweight(self) -> torch.Tensor:
        qmax = qrange(self.bits, symmetric=True)[1]
        g = 1.0 / math.sqrt(self.weight[0].numel() * qmax)
        scale = grad_scale(self.weight_scale, g).abs().clamp_min(1e-8)
        if self.int8_target is not None:  # the grid the exported integer kernel will use
            assert isinstance(self, nn.Module)
            floor = min_weight_scale(self.weight, self.int8_target, depthwise=depthwise_layer(self))
            scale = torch.maximum(scale, floor.to(scale))
        zp = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        return fake_quantize(self.weight, scale, zp, self.bits, symmetric=True, axis=0)


class LSQConv2d(nn.Conv2d, _LSQWeight):
    """Conv2d trained with fake-quantized weights (LSQ)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.qweight(), self.bias)


class LSQLinear(nn.Linear, _LSQWeight):
    """Linear trained with fake-quantized weights (LSQ)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.qweight(), self.bias)


def _lsq_layer(layer: nn.Module, bits: int) -> LSQConv2d | LSQLinear:
    assert isinstance(layer, (nn.Conv2d, nn.Linear))
    scale = weight_scale(layer.weight, bits)
    lsq: LSQConv2d | LSQLinear
    if isinstance(layer, nn.Conv2d):
        lsq = LSQConv2d(layer.in_channels, layer.out_channels,
                        layer.kernel_size, layer.stride,  # type: ignore[arg-type]
                        layer.padding, layer.dilation,  # type: ignore[arg-type]
                        layer.groups, layer.bias is not None, layer.padding_mode)
    else:
        lsq = LSQLinear(layer.in_features, layer.out_features, layer.bias is not None)
    lsq.load_state_dict(layer.state_dict())
    lsq._init_lsq(bits, scale)  # type: ignore[operator]
    return lsq.to(layer.weight.device)


class LSQActQuant(nn.Module):
    """Per-tensor activation fake-quantizer with a learnable scale (fixed zero point)."""

    zero_point: torch.Tensor

    def __init__(self, frozen: ActQuant) -> None:
        super().__init__()
        self.bits, self.symmetric = frozen.bits, frozen.symmetric
        self.scale = nn.Parameter(frozen.scale.detach().clone())
        self.register_buffer("zero_point", frozen.zero_point.detach().clone())

    def forward(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        qmax = qrange(self.bits, symmetric=self.symmetric)[1]
        g = 1.0 / math.sqrt(x.numel() * qmax)
        scale = grad_scale(self.scale, g).abs().clamp_min(1e-8)
        return fake_quantize(x, scale, self.zero_point, self.bits, symmetric=self.symmetric)

    def to_frozen(self) -> ActQuant:
        out = ActQuant(self.bits, self.symmetric)
        with torch.no_grad():
            out.scale.copy_(self.scale.detach().abs().clamp_min(1e-8))
            out.zero_point.copy_(self.zero_point)
        return out.to(self.scale.device)


@dataclass(frozen=True, kw_only=True)
class QAT(TrainConfig, QuantSettings):
    """Quantization-aware training (LSQ learnable scales) with distillation from the reference.

    Quantization settings as in ``Quantize``; training settings as in ``Distill``
    (``temperature``, ``alpha``). Activation ranges are calibrated on ``calibration`` data,
    or on the ``train`` data when none is given. BatchNorm is folded before training, so the
    network trains without normalisation: keep the learning rate low. ``lr=None`` (the
    default) takes Adam 1e-5 when every weight and activation keeps 8 bits or more and 1e-4
    when any of them (``per_layer`` included) has fewer (:func:`default_lr`).
    Measured on the pretrained ResNet-20, 20 steps: Adam 1e-4 keeps 91.6% accuracy, Adam 1e-3
    falls to 31% and SGD 0.01 (a usual distillation rate) to 11%. For *agreement* at 8 bits the
    rate must be lower still: after ``Quantize``-quality ranges, 200 steps at Adam 1e-4 cost
    0.6–1.6 points of top-1 agreement with FP32 on ResNet-20, at 1e-5 none (and none gained):
    8-bit weights move a few quantization steps at 1e-4, while lower bit widths have steps
    large enough to need it.
    The quantizer of a lossless input grid keeps its scale 1 (its codes are the pixels).
    Like every recovery, ``range_reg``
    (``linf``, ``margin``, ``soft_min_max``) adds an R² range penalty on the weights.
    """

    lr: float | None = None  # type: ignore[assignment]  # resolved in __post_init__
    temperature: float = 4.0
    alpha: float = 0.9
    learn_scales: bool = True

    def __post_init__(self) -> None:
        self._check_quant()
        if self.lr is None:
            object.__setattr__(self, "lr", default_lr(self))
        self._check_train()
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise RecipeError(f"QAT: temperature={self.temperature!r} must be > 0")
        check_fraction("QAT", "alpha", self.alpha, hi_open=False)


def default_lr(settings: QuantSettings) -> float:
    """QAT's Adam learning rate when none is given: 1e-5 when every weight and activation
    keeps at least 8 bits (PTQ is already close, and 1e-4 moves 8-bit weights by several
    quantization steps of noise: 0.6-1.6 points of agreement lost on ResNet-20), else 1e-4."""
    widths = [settings.weights, *settings.per_layer.values()]
    if settings.activations is not None:
        widths.append(settings.activations)
    return 1e-5 if min(widths) >= 8 else 1e-4


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@register(QAT, kind="recover", needs=("train",))
def _apply_qat(model: nn.Module, cfg: QAT, ctx: Context) -> nn.Module:
    target, plan, acts, notes = prepare(model, cfg, ctx)
    cpu = resolve_target(cfg.target)
    integer = set(integer_layers(target, list(plan)))
    for name, bits in plan.items():
        lsq = _lsq_layer(target.get_submodule(name), bits)
        lsq.int8_target = cpu if name in integer else None
        _set(target, name, lsq)
    learned = [n for n in acts if n not in lattice_quantizers(target)]  # lossless input: fixed
    for name in learned:
        aq = target.get_submodule(name)
        assert isinstance(aq, ActQuant)
        _set(target, name, LSQActQuant(aq))
    if not cfg.learn_scales:
        for p in [*[target.get_submodule(n).scale for n in learned],  # type: ignore[union-attr]
                  *[target.get_submodule(n).weight_scale for n in plan]]:
            p.requires_grad_(False)

    def distill(out: torch.Tensor, teacher: torch.Tensor | None,
                labels: torch.Tensor | None) -> torch.Tensor:
        assert teacher is not None
        return distillation_loss(out, teacher, labels, cfg.temperature, cfg.alpha)

    summary = train(target, ctx, cfg, distill, needs_teacher=True)
    for name in learned:
        aq = target.get_submodule(name)
        assert isinstance(aq, LSQActQuant)
        _set(target, name, aq.to_frozen())
    ctx.apply_masks(target)
    for name, bits in plan.items():
        layer = target.get_submodule(name)
        assert isinstance(layer, (LSQConv2d, LSQLinear))
        _set(target, name, quantize_weights(layer, bits, layer.weight_scale.detach().abs()
                                            .clamp_min(1e-8), target=layer.int8_target))
    bias_on_grid(target, list(plan))
    drop_masks(target, ctx)
    ctx.record(cfg.type_name(), **{**summary, "layers": len(plan), "target": cpu,
                                   "integer_layers": len(integer),
                                   **notes,
                                   "activation_quantizers": len(acts)})
    return target.eval()
