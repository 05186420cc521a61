"""Activation ranges chosen for agreement (Quantize(range_search=True)) and float heads."""

import itertools

import pytest
import torch
from torch import nn

import netpress as npr
from netpress.quant.modules import ActQuant
from netpress.quant.primitives import choose_qparams, qrange
from netpress.quant.ptq import Quantize
from netpress.quant.ranges import RATIOS, candidate_costs
from netpress.testing import TinyCNN, TinyResNet, toy_batches


def _brute_cost(x, g, lo, hi, bits, ratio):
    """The same expectation, element by element with Python loops."""
    scale, zp = choose_qparams(lo * ratio, hi * ratio, bits, symmetric=False)
    qmin, qmax = qrange(bits, symmetric=False)
    a, b = float((qmin - zp) * scale), float((qmax - zp) * scale)
    total = 0.0
    for n in range(x.shape[0]):
        proj = 0.0
        for idx in itertools.product(*[range(s) for s in x.shape[1:]]):
            v, w = float(x[(n, *idx)]), float(g[(n, *idx)])
            total += w * w * float(scale) ** 2 / 12
            proj += w * (min(max(v, a), b) - v)
        total += proj * proj
    return total


def test_candidate_costs_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, generator=gen).relu() * 3
    x[0, 0, 0] = 12.0  # an outlier that clipping cuts
    g = torch.randn(3, 2, 4, generator=gen)
    lo, hi = torch.tensor(0.0), x.max()
    costs = candidate_costs(x, g, lo, hi, 4)
    assert costs.shape == (len(RATIOS),)
    for k, r in enumerate(RATIOS):
        assert costs[k].item() == pytest.approx(_brute_cost(x, g, lo, hi, 4, r), rel=1e-5)


def test_clipping_is_chosen_only_where_outliers_do_not_matter():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(64, 32, generator=gen)
    x[:, 0] = 20.0 * torch.rand(64, generator=gen)  # one wide channel
    lo, hi = torch.tensor(0.0), x.max()
    blind = torch.ones_like(x)
    blind[:, 0] = 0.0  # the outputs ignore the wide channel: clip it, round the rest finely
    assert int(torch.argmin(candidate_costs(x, blind, lo, hi, 8))) == len(RATIOS) - 1
    watched = torch.zeros_like(x)
    watched[:, 0] = 1.0  # only the wide channel matters: keep the whole range
    assert int(torch.argmin(candidate_costs(x, watched, lo, hi, 8))) == 0


def _agreement_and_sqnr(model, cfg, n=512):
    data = toy_batches(n, 64, model=model)
    q = npr.compress(model, cfg, calibration=data[: len(data) // 2], measure=False).model
    x = torch.cat([b[0] for b in data[len(data) // 2:]])  # held out from calibration
    with torch.no_grad():
        ref, out = model(x), q(x)
    noise = (out - ref).pow(2).mean() / ref.pow(2).mean()
    return q, float((ref.argmax(1) == out.argmax(1)).float().mean()), float(noise)


def test_range_search_keeps_predictions():
    torch.manual_seed(0)
    model = TinyResNet(width=8).eval()
    q, agree, noise = _agreement_and_sqnr(model, Quantize(activations=4, range_search=True))
    _, agree_mm, noise_mm = _agreement_and_sqnr(model, Quantize(activations=4,
                                                                     range_search=False))
    assert agree >= 0.9 and noise <= 1.5 * noise_mm, (agree, noise, agree_mm, noise_mm)
    scales = [float(m.scale) for m in q.modules() if isinstance(m, ActQuant)]
    assert scales and all(s > 0 for s in scales)


def test_float_head_reads_an_unrounded_pool():
    torch.manual_seed(0)
    model = TinyCNN(width=8).eval()
    q = npr.compress(model, Quantize(ignore=("fc",)), calibration=toy_batches(64, 32,
                     model=model), measure=False).model
    assert isinstance(q.get_submodule("fc"), nn.Linear)
    quantizers = [n for n in q.graph.nodes if n.op == "call_module"
                  and isinstance(q.get_submodule(str(n.target)), ActQuant)]
    # the last quantizer is the ReLU after conv2 (an integer conv's output), not the pool's
    last = quantizers[-1]
    assert all(u.op != "call_module" or u.target != "fc" for u in last.users)
    assert not any("avg_pool" in str(a) for a in last.args)


def test_models_with_dict_outputs_are_equalized_and_range_searched():
    # equalization and range_search follow the logits of a dict / ModelOutput output
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = self.c2(self.c1(x).relu()).relu().mean((2, 3))
            return {"logits": self.fc(h), "embedding": h}

    torch.manual_seed(0)
    model = DictOut().eval()
    data = [(torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)) for _ in range(4)]
    res = npr.compress(model, npr.Quantize(), calibration=data, example_inputs=data[0][0],
                       measure=False)
    step = res.report.to_dict()["steps"][0]
    assert step["range_search"]["quantizers"] > 0 and "equalization" in step
    x = torch.randn(64, 3, 16, 16)
    got, ref = res.model(x), model(x)
    agree = float((got["logits"].argmax(1) == ref["logits"].argmax(1)).float().mean())
    assert set(got) == {"logits", "embedding"} and agree >= 0.9
