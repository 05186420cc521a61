"""A server-side decoder of its own width and depth (``decoder_hidden`` / ``decoder_depth``,
residual blocks): shapes, parameter counts, unchanged device side and default layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netpress as npr
from netpress.errors import ModelError, RecipeError
from netpress.measure.macs import count_macs
from netpress.models import resnet20
from netpress.split import SplitModel, cut_model
from netpress.split.bottleneck import ResidualBlock, build_bottleneck

from .test_split import _task

#: ``build_bottleneck((2, 32, 16, 16), 7, 2, hidden=64, depth=2)`` before decoder settings
#: existed (the issue-15 benchmark's 7×8×8 latent): state_dict names and shapes, with the
#: BatchNorm buffers left out (every BatchNorm weight ``w`` has ``bias``, ``running_mean``,
#: ``running_var`` of its shape and a scalar ``num_batches_tracked``).
OLD_STRIDE2 = {
    "encoder.0.weight": (64, 32, 3, 3), "encoder.1.weight": (64,),
    "encoder.3.weight": (64, 64, 3, 3), "encoder.4.weight": (64,),
    "encoder.6.weight": (7, 64, 1, 1), "encoder.7.weight": (7,),
    "decoder.0.weight": (7, 64, 4, 4), "decoder.1.weight": (64,),
    "decoder.3.weight": (64, 64, 3, 3), "decoder.4.weight": (64,),
    "decoder.6.weight": (32, 64, 3, 3), "decoder.6.bias": (32,),
}
OLD_BN = {"encoder.1", "encoder.4", "encoder.7", "decoder.1", "decoder.4"}
#: ``build_bottleneck((2, 5, 12), 3, 4, hidden=6)``, a Linear bottleneck, before the change.
OLD_LINEAR = {
    "encoder.0.weight": (6, 12), "encoder.0.bias": (6,), "encoder.2.weight": (3, 6),
    "encoder.2.bias": (3,), "encoder.3.weight": (3,), "encoder.3.bias": (3,),
    "decoder.0.weight": (6, 3), "decoder.0.bias": (6,), "decoder.2.weight": (12, 6),
    "decoder.2.bias": (12,),
}


def _shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_default_decoder_keeps_the_old_layout_exactly():
    expected = dict(OLD_STRIDE2)
    for bn in OLD_BN:
        w = expected[f"{bn}.weight"]
        expected.update({f"{bn}.bias": w, f"{bn}.running_mean": w, f"{bn}.running_var": w,
                         f"{bn}.num_batches_tracked": ()})
    b = build_bottleneck((2, 32, 16, 16), 7, 2, hidden=64, depth=2)
    assert _shapes(b) == expected
    assert not any(isinstance(m, ResidualBlock) for m in b.modules())
    assert _shapes(build_bottleneck((2, 5, 12), 3, 4, hidden=6)) == OLD_LINEAR


@pytest.mark.parametrize(("hidden", "depth"), [(128, 3), (16, 1), (24, 4), (None, 2), (32, None)])
def test_decoder_settings_set_the_shapes_and_the_parameter_count(hidden, depth):
    torch.manual_seed(0)
    b = build_bottleneck((2, 32, 16, 16), 7, 2, hidden=64, depth=2,
                         decoder_hidden=hidden, decoder_depth=depth).eval()
    h, d = hidden or 64, depth or 2
    blocks = [m for m in b.decoder.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == d - 1
    # transposed conv 7->h (4×4, no bias) + BN; per block two 3×3 h->h convs (no bias) and
    # two BNs; the last 3×3 conv h->32 with bias
    assert _params(b.decoder) == 7 * h * 16 + 2 * h + (d - 1) * (18 * h * h + 4 * h) \
        + 9 * h * 32 + 32
    x = torch.randn(3, 32, 16, 16)
    with torch.no_grad():
        assert b.codes(x).shape == (3, 7, 8, 8)
        assert b(x).shape == x.shape
        feats = b.decoder[:3](b.quant.dequantize(b.codes(x)))  # the transposed conv's stage
        assert feats.shape == (3, h, 16, 16)  # every residual block runs at the cut's 16×16


def test_strided_decoder_puts_blocks_after_each_upsampling_stage():
    b = build_bottleneck((2, 16, 16, 16), 4, 3, stride=4, hidden=8, depth=2,
                         decoder_hidden=12, decoder_depth=3).eval()
    kinds = [type(m).__name__ for m in b.decoder]
    assert kinds == ["ConvTranspose2d", "BatchNorm2d", "ReLU", "ResidualBlock", "ResidualBlock",
                     "ConvTranspose2d", "BatchNorm2d", "ReLU", "ResidualBlock", "ResidualBlock",
                     "Conv2d"]
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        assert b.codes(x).shape == (2, 4, 4, 4) and b(x).shape == x.shape


def test_residual_block_is_relu_of_input_plus_conv_bn_relu_conv_bn():
    torch.manual_seed(0)
    block = ResidualBlock(5)
    for bn in (block.body[1], block.body[4]):  # statistics that are not the identity
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    block.eval()
    x = torch.randn(2, 5, 6, 6)

    def bn(y: torch.Tensor, m: nn.BatchNorm2d) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        return (y - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps) \
            * m.weight.view(shape) + m.bias.view(shape)

    c1, b1, c2, b2 = block.body[0], block.body[1], block.body[3], block.body[4]
    y = bn(F.conv2d(torch.relu(bn(F.conv2d(x, c1.weight, padding=1), b1)), c2.weight,
                    padding=1), b2)
    with torch.no_grad():
        assert torch.allclose(block(x), torch.relu(x + y), atol=1e-5)


def test_decoder_settings_leave_the_device_side_unchanged():
    torch.manual_seed(0)
    cut = cut_model(resnet20().eval(), "layer2")
    x = torch.randn(1, 3, 32, 32)
    small = build_bottleneck((2, 32, 16, 16), 7, 2, hidden=64, depth=2)
    big = build_bottleneck((2, 32, 16, 16), 7, 2, hidden=64, depth=2,
                           decoder_hidden=128, decoder_depth=3)
    assert _shapes(small.encoder) == _shapes(big.encoder)
    dev = [count_macs(SplitModel(cut.head, b, cut.tail, at="layer2").device_part(), x)
           for b in (small, big)]
    assert dev[0] == dev[1] > 0
    h = torch.randn(1, 32, 16, 16)
    dec = [count_macs(b.decoder, torch.zeros(1, 7, 8, 8)) for b in (small, big)]
    # transposed conv 7·h·16·64 positions of the 8×8 input, blocks 18·h²·256, last conv 9·h·32·256
    assert dec[0] == 7 * 64 * 16 * 64 + 9 * 64 * 64 * 256 + 9 * 64 * 32 * 256
    assert dec[1] == 7 * 128 * 16 * 64 + 2 * 18 * 128 * 128 * 256 + 9 * 128 * 32 * 256
    with torch.no_grad():
        assert big.eval()(h).shape == h.shape


def test_linear_bottleneck_takes_the_decoder_width():
    b = build_bottleneck((2, 5, 12), 3, 4, hidden=6, decoder_hidden=20, decoder_depth=3)
    assert _shapes(b.decoder) == {"0.weight": (20, 3), "0.bias": (20,), "2.weight": (12, 20),
                                  "2.bias": (12,)}
    assert _shapes(b.encoder) == {k[len("encoder."):]: v for k, v in OLD_LINEAR.items()
                                  if k.startswith("encoder.")}


@pytest.mark.parametrize("name", ["decoder_hidden", "decoder_depth"])
@pytest.mark.parametrize("value", [0, -2, 1.5, True, "64"])
def test_bad_decoder_settings_are_refused(name, value):
    with pytest.raises(ModelError, match=name):
        build_bottleneck((2, 8, 8, 8), 4, 4, **{name: value})
    with pytest.raises(RecipeError, match=f"{name}=.*must be an int >= 1 or null"):
        npr.Split(**{name: value})


def test_split_trains_with_a_bigger_server_decoder(one_thread):
    model, data = _task()
    cfg = npr.Split(at="conv1", channels=4, bits=3, stride=2, hidden=8, depth=2,
                    decoder_hidden=16, decoder_depth=2, stage1_steps=20, stage2_steps=40,
                    lr=3e-3, train_head=False, cache_head=True, tail_lr=1e-3, alpha=1.0,
                    temperature=2.0)
    res = npr.compress(model, cfg, train=data, evaluate=data, example_inputs=data[0][0][:1])
    decoder = res.model.bottleneck.decoder
    assert sum(isinstance(m, ResidualBlock) for m in decoder.modules()) == 1
    assert decoder[-1].in_channels == 16 and res.model.bottleneck.encoder[0].out_channels == 8
    assert res.report["split"]["code_shape"] == [4, 4, 4]
    assert res.report["agreement"] >= 0.9
