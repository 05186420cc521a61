"""Weight-only low-bit quantization (2 to 8 bits), with no data needed.

``WeightOnly(bits=4)`` replaces each selected Conv2d/Linear by its integer-weight counterpart
(symmetric, per output channel, MSE-optimal clipping by default); activations stay float.
The codes are stored packed in the artefact (``packed_int``: 4-bit layers take half a byte
per weight). With calibration data, ``Quantize(weights=4, activations=None)`` adds bias
correction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from netpress.config import MethodConfig
from netpress.context import Context
from netpress.errors import RecipeError
from netpress.quant.modules import quantize_layer
from netpress.quant.primitives import MAX_BITS, MIN_BITS
from netpress.quant.ptq import drop_masks, weight_scale
from netpress.registry import register
from netpress.select import check_patterns, resolve_per_layer, select_names

__all__ = ["WeightOnly"]


@dataclass(frozen=True, kw_only=True)
class WeightOnly(MethodConfig):
    """Weight-only quantization to ``bits`` (2..8) per output channel; no data needed.

    ``per_layer`` maps layer names or ``re:`` patterns to their own bit width;
    ``weight_observer`` is ``mse`` (clipping searched per channel) or ``minmax``.
    """

    bits: int = 4
    layers: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = ()
    per_layer: Mapping[str, int] = field(default_factory=dict)
    weight_observer: str = "mse"

    def __post_init__(self) -> None:
        for key, bits in [("bits", self.bits), *[(f"per_layer[{k!r}]", v)
                                                 for k, v in self.per_layer.items()]]:
            if not isinstance(bits, int) or isinstance(bits, bool) \
                    or not MIN_BITS <= bits <= MAX_BITS:
                raise RecipeError(f"WeightOnly: {key}={bits!r} must be an int in "
                                  f"[{MIN_BITS}, {MAX_BITS}]")
        if self.weight_observer not in ("mse", "minmax"):
            raise RecipeError(f"WeightOnly: weight_observer={self.weight_observer!r}; choose "
                              "'mse' or 'minmax'")
        check_patterns("WeightOnly", layers=self.layers, ignore=self.ignore)


@register(WeightOnly, kind="quantize")
def _apply_weight_only(model: nn.Module, cfg: WeightOnly, ctx: Context) -> nn.Module:
    candidates = {n: m for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
    names = select_names(list(candidates), cfg.layers, cfg.ignore, owner="WeightOnly")
    bits = resolve_per_layer(names, cfg.per_layer, cfg.bits, owner="WeightOnly")
    for name in names:
        layer = candidates[name]
        assert isinstance(layer, (nn.Conv2d, nn.Linear))
        scale = weight_scale(layer.weight, bits[name], cfg.weight_observer)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf,
                quantize_layer(layer, bits[name], scale))
    drop_masks(model, ctx)
    ctx.record("WeightOnly", layers=len(names), bits=dict(sorted(bits.items())))
    return model
