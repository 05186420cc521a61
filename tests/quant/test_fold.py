"""BatchNorm folding is exact (within float tolerance) and finds the right pairs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netpress.models import build_model
from netpress.quant.fold import fold_batchnorm, fold_bn_pairs
from netpress.testing import TinyCNN


def _randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.1)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def test_fold_tiny_cnn_is_exact():
    torch.manual_seed(0)
    model = _randomise_bn(TinyCNN())
    ref = copy.deepcopy(model)
    assert fold_batchnorm(model) == [("conv1", "bn1")]
    assert isinstance(model.bn1, nn.Identity) and model.conv1.bias is not None
    x = torch.randn(8, 1, 8, 8)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_fold_cifar_resnet20_is_exact():
    model = _randomise_bn(build_model("cifar_resnet20"))
    ref = copy.deepcopy(model)
    pairs = fold_batchnorm(model)
    assert len(pairs) == 19  # every conv of ResNet-20 has its BN
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch: fx cannot trace it
            x = x * 1.0
        return F.relu(self.bn1(self.conv1(x)))


def test_untraceable_model_falls_back_to_sibling_names():
    model = _randomise_bn(_Untraceable())
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="sibling names"):
        assert fold_batchnorm(model) == [("conv1", "bn1")]
    x = torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


class _Shared(nn.Module):
    """The BN's conv output is also used elsewhere: folding would change that use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_with_other_users_is_not_folded():
    assert fold_bn_pairs(_Shared().eval()) == []
