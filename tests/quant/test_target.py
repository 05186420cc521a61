"""INT8 targets: detection from fake flag sets, weight rules, and what each target computes on
every kind of CPU (through the kernel emulation, so the tests hold on any CPU)."""

import pytest
import torch
from torch import nn

import netpress as npr
from netpress.errors import RecipeError
from netpress.quant import Quantize
from netpress.quant.emulate import emulated_kernels
from netpress.quant.modules import QuantWeight
from netpress.quant.ptq import quantize_weights, round_to_nearest
from netpress.quant.saturation import kernel_rows, saturating_pairs
from netpress.quant.target import (
    TARGETS,
    WEIGHT_RULES,
    apply_weight_rule,
    cpu_flags,
    depthwise_layer,
    detect_target,
    exact_on,
    host_target,
    min_weight_scale,
    resolve_target,
)


@pytest.mark.parametrize("flags,machine,expected", [
    ({"sse4_1", "avx", "avx2", "fma"}, "x86_64", "x86-avx2"),           # Haswell, Zen 1-3
    ({"avx2", "avx512f", "avx512bw"}, "x86_64", "x86-avx2"),             # Skylake-X: no VNNI
    ({"avx2", "avx512bw", "avx512_vnni"}, "x86_64", "x86-vnni"),         # Cascade Lake, Zen 4
    ({"avx2", "avx_vnni"}, "x86_64", "x86-vnni"),                        # Alder Lake
    ({"AVX2", "AVX512_VNNI"}, "AMD64", "x86-vnni"),                      # case-insensitive
    ({"sse4_2"}, "x86_64", "generic"),                                   # no AVX2
    ({"fp", "asimd", "asimddp"}, "aarch64", "arm64"),
    (set(), "arm64", "arm64"),
    ({"avx2"}, "ppc64le", "generic"),
    (set(), "riscv64", "generic"),
])
def test_detect_target_from_flags(flags, machine, expected):
    assert detect_target(flags, machine) == expected


def test_host_detection_is_one_of_the_targets():
    assert host_target() in TARGETS
    assert resolve_target("auto") == host_target()
    assert resolve_target("generic") == "generic"
    assert isinstance(cpu_flags(), frozenset)


def test_target_is_validated_and_round_trips():
    with pytest.raises(RecipeError, match="target='avx3'.*auto"):
        Quantize(target="avx3")
    cfg = Quantize(target="x86-avx2")
    assert Quantize.from_dict(cfg.to_dict()) == cfg


def _big_pairs_weight(out=8, cin=6):
    torch.manual_seed(0)
    w = torch.randn(out, cin, 3, 3) * 0.1
    w[:, 0:2, 1, 1] = 1.0  # adjacent channels at one tap: a same-sign pair at full range
    w[:, 2:4, 0, 0] = torch.tensor([1.9, -0.5])  # one large weight, safe neighbour
    return w


@pytest.mark.parametrize("target", TARGETS)
def test_weight_rules_hold_and_claims_are_exact(target):
    w = _big_pairs_weight()
    base = w.reshape(8, -1).abs().amax(1) / 127
    scale = torch.maximum(base, min_weight_scale(w, target))
    codes = apply_weight_rule(round_to_nearest(w, scale, 8), target)
    assert torch.equal(codes, round_to_nearest(w, scale, 8))  # nearest codes already obey
    rule = WEIGHT_RULES[target]
    assert int(codes.abs().max()) <= rule.max_code
    exact = {cpu for cpu in TARGETS if exact_on(cpu, codes)}
    assert {"x86-vnni", "arm64"} <= exact
    assert ("x86-avx2" in exact) == (target in ("x86-avx2", "generic"))
    assert ("generic" in exact) == (target == "generic")
    # the scale grows only where the rule needs it: at most 2x (the 7-bit bound)
    assert (scale <= 2.0 * base + 1e-12).all()
    if target in ("x86-vnni", "arm64"):
        assert torch.equal(scale, base)


def test_depthwise_layers_need_no_pair_bound():
    dw = nn.Conv2d(4, 4, 3, groups=4)
    assert depthwise_layer(dw) and not depthwise_layer(nn.Conv2d(4, 8, 3, groups=4))
    with torch.no_grad():
        dw.weight.fill_(1.0)
    q = quantize_weights(dw, 8, torch.full((4,), 1 / 127), target="x86-avx2")
    assert int(q.weight_q.abs().max()) == 127  # full range: the depthwise kernel is exact
    assert exact_on("x86-avx2", q.weight_q, depthwise=True)
    assert not exact_on("x86-avx2", q.weight_q)


class _Wide(nn.Module):
    """A conv net whose trained-looking weights have large same-sign neighbours."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.conv2.weight.copy_(_big_pairs_weight(8, 8))

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_computes_exactly_where_it_claims(target):
    torch.manual_seed(0)
    model = _Wide().eval()
    data = [(torch.randn(16, 1, 6, 6) * 2, torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    result = npr.compress(model, Quantize(target=target), calibration=data, measure=False)
    q = result.model
    step = [r for r in result.report["steps"] if r["step"] == "Quantize"][0]
    assert step["target"] == target and step["integer_layers"] == 3
    layers = [m for m in q.modules() if isinstance(m, QuantWeight)]
    assert all(m.target == target for m in layers)
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        fake = q(x)
        with emulated_kernels(q, "x86-avx2"):
            avx2 = q(x)
        with emulated_kernels(q, "x86-vnni"):
            vnni = q(x)
    torch.testing.assert_close(vnni, fake, rtol=1e-4, atol=1e-4)
    saturates = any(saturating_pairs(kernel_rows(m.weight_q)).any() for m in layers)
    if target in ("x86-avx2", "generic"):
        assert not saturates
        torch.testing.assert_close(avx2, fake, rtol=1e-4, atol=1e-4)
    else:  # full int8 weights: the emulated AVX2 machine computes something else
        assert saturates and float((avx2 - fake).abs().max()) > 0.01


def test_layers_refuse_unknown_target_labels():
    from netpress.quant.modules import QuantConv2d, QuantLinear

    with pytest.raises(ValueError, match="target='evil'"):
        QuantLinear(4, 2, target="evil")
    assert "target=generic" in repr(QuantConv2d(2, 2, (3, 3), target="generic"))
