"""SparseGPT on the real pretrained ResNet-20: one shot, far more faithful than magnitude."""

import pytest
import torch

import netpress as npr
from netpress import datasets as ds
from netpress.models import find_pretrained, load_pretrained_cifar_resnet


@pytest.mark.shared_data
@pytest.mark.slow
def test_sparsegpt_70_percent_on_resnet20_beats_magnitude_by_far(shared_data, one_thread):
    ref = load_pretrained_cifar_resnet(20, find_pretrained(20, shared_data))
    x, y = ds.cifar10_jpeg_train(shared_data, limit=128, seed=0).tensors
    calib = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 128, 64)]
    test = ds.cifar10_jpeg_test(shared_data, limit=1000).tensors[0]
    sgpt = npr.compress(ref, npr.SparseGPT(sparsity=0.7, allocation="global"),
                        calibration=calib, measure=False).model
    mag = npr.compress(ref, npr.GlobalMagnitudePrune(sparsity=0.7), measure=False).model
    with torch.no_grad():
        base, a, b = (m(test).argmax(1) for m in (ref, sgpt, mag))
    agree_sgpt = float((a == base).float().mean())
    agree_mag = float((b == base).float().mean())
    assert agree_sgpt >= 0.80 and agree_sgpt >= agree_mag + 0.15, (agree_sgpt, agree_mag)
