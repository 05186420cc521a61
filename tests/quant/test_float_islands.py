"""Layers left in float (``Quantize(ignore=...)``): where their inputs are, and are not, rounded."""

import torch
from torch import fx

import netpress as npr
from netpress.quant import Quantize
from netpress.quant.modules import ActQuant
from netpress.testing import TinyCNN


def _calib():
    torch.manual_seed(0)
    return [(torch.randn(16, 1, 8, 8), torch.zeros(16, dtype=torch.long)) for _ in range(2)]


def _reads_input_quantized(gm: fx.GraphModule) -> bool:
    (placeholder,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return any(u.op == "call_module" and isinstance(gm.get_submodule(str(u.target)), ActQuant)
               for u in placeholder.users)


def test_an_input_read_only_by_a_float_layer_stays_float():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    stem_float = npr.compress(model, Quantize(ignore=("conv1",), range_search=False),
                              calibration=_calib(), measure=False).model
    assert isinstance(stem_float, fx.GraphModule) and not _reads_input_quantized(stem_float)
    everything = npr.compress(model, Quantize(range_search=False), calibration=_calib(),
                              measure=False).model
    assert isinstance(everything, fx.GraphModule) and _reads_input_quantized(everything)
