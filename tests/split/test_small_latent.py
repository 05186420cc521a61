"""A small latent for split computing: a deeper strided encoder (``depth``) and stage 2's
logit squared error (``Split(logit_mse=...)``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netpress as npr
from netpress.errors import ModelError, RecipeError
from netpress.split.bottleneck import build_bottleneck
from netpress.split.method import _kd_loss

from .test_split import _task


def _convs(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.ConvTranspose2d))]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_depth_adds_stride1_convs_per_stage_and_keeps_the_shapes(depth):
    torch.manual_seed(0)
    b = build_bottleneck((2, 32, 16, 16), 8, 3, stride=4, hidden=16, depth=depth).eval()
    enc = _convs(b.encoder)
    # two stride-2 stages of `depth` 3x3 convs each, then the 1x1 conv to the code channels
    assert len(enc) == 2 * depth + 1
    assert [c.stride[0] for c in enc[:-1]].count(2) == 2
    assert len(_convs(b.decoder)) == 2 * depth + 1
    x = torch.randn(3, 32, 16, 16)
    with torch.no_grad():
        assert b.codes(x).shape == (3, 8, 4, 4)
        assert b(x).shape == x.shape
        q = b.codes(x)
        assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= 7


@pytest.mark.parametrize("depth", [0, -1, 1.5, True])
def test_bad_depth_is_refused(depth):
    with pytest.raises(ModelError, match="depth"):
        build_bottleneck((2, 8, 8, 8), 4, 4, depth=depth)
    with pytest.raises(RecipeError, match="depth"):
        npr.Split(depth=depth)


def test_bad_logit_mse_is_refused():
    with pytest.raises(RecipeError, match="logit_mse"):
        npr.Split(logit_mse=-0.1)


def test_stage2_loss_adds_the_logits_squared_error():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    temp, w = 2.0, 0.3
    loss = _kd_loss(npr.Split(alpha=1.0, temperature=temp, logit_mse=w))(s, t, None)
    # brute force: T² · mean over rows of Σ_c p_t (log p_t − log p_s), plus w · mean (s − t)²
    kl = 0.0
    for i in range(5):
        ps, pt = F.softmax(s[i] / temp, 0), F.softmax(t[i] / temp, 0)
        kl += float(sum(pt[c] * (pt[c].log() - ps[c].log()) for c in range(4)))
    mse = sum(float((s[i, c] - t[i, c]) ** 2) for i in range(5) for c in range(4)) / 20
    assert float(loss) == pytest.approx(temp ** 2 * kl / 5 + w * mse, rel=1e-5)
    plain = _kd_loss(npr.Split(alpha=1.0, temperature=temp))(s, t, None)
    assert float(plain) == pytest.approx(temp ** 2 * kl / 5, rel=1e-5)


def test_split_with_a_small_deep_latent_trains(one_thread):
    model, data = _task()
    cfg = npr.Split(at="conv1", channels=4, bits=3, stride=4, hidden=16, depth=2,
                    stage1_steps=20, stage2_steps=40, lr=3e-3, train_head=False,
                    cache_head=True, tail_lr=1e-3, alpha=1.0, temperature=2.0, logit_mse=0.1)
    res = npr.compress(model, cfg, train=data, evaluate=data, example_inputs=data[0][0][:1])
    sec = res.report["split"]
    assert sec["code_shape"] == [4, 2, 2] and sec["bits"] == 3  # 8×8 cut tensor, stride 4
    assert res.report["agreement"] >= 0.9
    assert sec["bytes_per_input_arithmetic"]["mean"] <= 4 * 2 * 2 * 3 / 8 + 1
