"""Per-layer quantization sensitivity: what quantizing only one layer does to the outputs.

For each selected Conv2d/Linear, the layer's weights alone are quantized to ``bits``
(symmetric, per channel) and the model is run on ``data``: the result is the top-1
agreement with the float model and the output SQNR in dB. Layers are swapped in place and
restored, so nothing is copied; the model is unchanged afterwards. Mixed-precision search
uses this to spend bits where they matter.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from netpress._inputs import move_to
from netpress.data import Data, batches
from netpress.measure.collect import evaluating, model_device, outputs_on
from netpress.measure.fidelity import agreement as top1_agreement
from netpress.quant.modules import quantize_layer
from netpress.quant.primitives import sqnr
from netpress.quant.ptq import weight_scale
from netpress.select import select_names

__all__ = ["layer_sensitivity"]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def layer_sensitivity(model: nn.Module, data: Data, *, bits: int = 8,
                      layers: Iterable[str] = ("re:.*",), ignore: Iterable[str] = (),
                      weight_observer: str = "mse", max_batches: int | None = None,
                      ) -> dict[str, dict[str, float]]:
    """``{layer: {"agreement": ..., "sqnr_db": ...}}`` with only that layer quantized.

    ``data`` is a re-iterable of ``(inputs, labels)`` batches (labels unused).
    """
    device = model_device(model)
    inputs = [move_to(x, device) for i, (x, _) in enumerate(batches(data, name="data"))
              if max_batches is None or i < max_batches]
    candidates = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    names = select_names(candidates, layers, ignore, owner="layer_sensitivity")
    out: dict[str, dict[str, float]] = {}
    with evaluating(model):
        reference = outputs_on(model, inputs)
        for name in names:
            layer = model.get_submodule(name)
            assert isinstance(layer, (nn.Conv2d, nn.Linear))
            _set(model, name, quantize_layer(layer, bits,
                                             weight_scale(layer.weight, bits, weight_observer)))
            try:
                approx = outputs_on(model, inputs)
            finally:
                _set(model, name, layer)
            agreement = top1_agreement(reference, approx) if reference.dim() >= 2 else 1.0
            out[name] = {"agreement": float(agreement), "sqnr_db": sqnr(reference, approx)}
    return out
