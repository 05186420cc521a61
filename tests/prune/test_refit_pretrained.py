"""The structured refit on real pretrained weights (CIFAR-10 ResNet-20): a refitted consumer's
output error against the unpruned model's layer, and the logits' agreement, on held-out
JPEG test images, against the same pruning without the refit."""

import pytest
import torch
from torch import nn

import netpress as npr


def _output_of(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    got: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: got.append(o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return got[0]


@pytest.mark.shared_data
@pytest.mark.slow
def test_refit_lowers_the_consumers_output_error_on_resnet20(pretrained_resnet20, one_thread):
    ref, calib, test = pretrained_resnet20(256, 500)

    def prune(**kw: object) -> nn.Module:
        cfg = npr.StructuredPrune(macs=0.5, protect=("conv1",), **kw)  # type: ignore[arg-type]
        return npr.compress(ref, cfg, calibration=calib, example_inputs=test[:1],
                            measure=False).model

    on, off = prune(), prune(reconstruct=False)
    # a block's second conv reads the pruned first conv's channels: its outputs (the rows
    # it keeps, all of them here: the residual stream is protected)
    layer = "layer3.2.conv2"
    want = _output_of(ref, layer, test)
    err_on = float((_output_of(on, layer, test) - want).pow(2).mean())
    err_off = float((_output_of(off, layer, test) - want).pow(2).mean())
    assert err_on < 0.75 * err_off, (err_on, err_off)  # measured 0.62
    with torch.no_grad():
        base, a, b = (m(test).argmax(1) for m in (ref, on, off))
    agree_on, agree_off = (float((p == base).float().mean()) for p in (a, b))
    # measured (256 calibration images, 500 test images): 69.2% against 39.8%
    assert agree_on >= 0.60 and agree_on >= agree_off + 0.20, (agree_on, agree_off)
