"""SparseGPT on the real pretrained ResNet-20: one shot, far more faithful than magnitude."""

import pytest
import torch

import netpress as npr


@pytest.mark.shared_data
@pytest.mark.slow
def test_sparsegpt_70_percent_on_resnet20_beats_magnitude_by_far(pretrained_resnet20,
                                                                 one_thread):
    ref, calib, test = pretrained_resnet20(128, 1000)
    sgpt = npr.compress(ref, npr.SparseGPT(sparsity=0.7, allocation="global"),
                        calibration=calib, measure=False).model
    mag = npr.compress(ref, npr.GlobalMagnitudePrune(sparsity=0.7), measure=False).model
    with torch.no_grad():
        base, a, b = (m(test).argmax(1) for m in (ref, sgpt, mag))
    agree_sgpt = float((a == base).float().mean())
    agree_mag = float((b == base).float().mean())
    assert agree_sgpt >= 0.80 and agree_sgpt >= agree_mag + 0.15, (agree_sgpt, agree_mag)
