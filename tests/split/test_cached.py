"""Split(cache_head=True): both stages from one pass of the head and the teacher; tail_lr;
a rate-free stage 1 (stage1_rate=0) and the entropy model fitted to its codes (fit_prior)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netpress as npr
from netpress.errors import ModelError, RecipeError
from netpress.split.bottleneck import build_bottleneck
from netpress.split.cached import build_cache, fit_cached, fit_prior
from netpress.split.cut import cut_model

from .test_split import _task


def _agreement(a: nn.Module, b: nn.Module, data: list) -> float:
    with torch.no_grad():
        return float(torch.cat([(a(x).argmax(1) == b(x).argmax(1)).float()
                                for x, _ in data]).mean())


def test_the_cache_holds_the_head_and_the_original_outputs():
    model, data = _task()
    cut = cut_model(model, "bn1")
    cache = build_cache(data, cut.head, cut.tail, torch.device("cpu"))
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        h = cut.head(x)
        assert torch.allclose(cache.h.float(), h, atol=2e-3 * float(h.abs().max()))
        assert torch.allclose(cache.logits, model(x), atol=1e-4)
    assert cache.h.dtype == torch.float16 and cache.batch == 32 and len(cache) == 256
    assert torch.equal(cache.labels, torch.cat([b[1] for b in data]))
    seen = torch.cat([h for h, _, _ in cache.batches(torch.Generator().manual_seed(0))])
    assert seen.shape == (256, 8, 8, 8)  # one epoch visits every cached input once


def test_fit_cached_trains_each_group_at_its_own_rate():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 2)
    module = nn.Sequential(a, nn.ReLU(), b)
    cache = build_cache([(torch.randn(16, 4), torch.zeros(16))] * 2, nn.Identity(),
                        nn.Linear(4, 2), torch.device("cpu"))
    a0, b0 = a.weight.detach().clone(), b.weight.detach().clone()

    def loss(out, ref, _labels):
        return (out - ref).pow(2).mean()

    summary = fit_cached(module, cache, loss, "output", steps=5,
                         groups=[([*a.parameters()], 1e-2), ([*b.parameters()], 1e-6)],
                         optimizer="adam")
    assert summary["steps"] == 5 and summary["cached"]
    moved_a = float((a.weight.detach() - a0).abs().max())
    moved_b = float((b.weight.detach() - b0).abs().max())
    assert moved_a > 1e-3 and moved_b < 1e-5  # Adam steps are about lr per step


@pytest.mark.parametrize("entropy", ["none", "factorized"])
def test_cached_training_is_faithful_and_keeps_the_head(one_thread, entropy):
    model, data = _task()
    cfg = npr.Split(at="bn1", channels=4, bits=8, stride=1, stage1_steps=60, stage2_steps=60,
                    lr=3e-3, train_head=False, stage2_trains=("encoder", "decoder", "tail"),
                    cache_head=True, tail_lr=3e-4, alpha=1.0, entropy=entropy,
                    rate=1e-4 if entropy == "factorized" else 0.0)
    res = npr.compress(model, cfg, train=data, measure=False)
    split = res.model
    record = res.report["steps"][0]
    assert record["stage1"]["cached"] and record["stage2"]["cache_inputs"] == 256
    assert record["stage2"]["tail_lr"] == 3e-4
    assert _agreement(split, model, data) >= 0.85
    for name, value in model.state_dict().items():
        if name.startswith(("conv1.", "bn1.")):
            assert torch.equal(split.head.state_dict()[name], value), name
    assert not torch.equal(split.tail.conv2.weight, model.conv2.weight)  # the tail trained


def test_a_frozen_tail_stays_exactly_as_it_was(one_thread):
    model, data = _task()
    cfg = npr.Split(at="bn1", channels=4, stride=1, stage1_steps=3, stage2_steps=3,
                    train_head=False, stage2_trains=("encoder", "decoder"), cache_head=True)
    split = npr.compress(model, cfg, train=data, measure=False).model
    assert torch.equal(split.tail.conv2.weight, model.conv2.weight)


def test_cache_settings_are_checked(one_thread):
    with pytest.raises(RecipeError, match="train_head=False"):
        npr.Split(cache_head=True)
    with pytest.raises(RecipeError, match="head"):
        npr.Split(cache_head=True, train_head=False, stage2_trains=("head", "tail"))
    with pytest.raises(RecipeError, match="cache_head=True"):
        npr.Split(tail_lr=1e-4, train_head=False)
    with pytest.raises(RecipeError, match="tail_lr"):
        npr.Split(tail_lr=0.0, cache_head=True, train_head=False)
    model, data = _task()
    cfg = npr.Split(at="bn1", channels=4, stride=1, stage1_steps=2, stage2_steps=2,
                    train_head=False, cache_head=True)
    with pytest.raises(ModelError, match="no longer the original"):
        npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.5), cfg], train=data,
                     measure=False)


def test_fit_prior_prices_the_codes_and_leaves_the_encoder():
    torch.manual_seed(0)
    b = build_bottleneck((2, 4, 6, 6), 3, 8, stride=1, entropy="factorized")
    with torch.no_grad():  # codes spread far wider than the untrained density's
        b.encoder[-2].weight.fill_(2.0)
    b.eval()  # the codes the device sends: BatchNorm at its running statistics
    cache = build_cache([(torch.randn(32, 4, 6, 6), torch.zeros(32))] * 4, nn.Identity(),
                        nn.Flatten(), torch.device("cpu"))
    h = cache.h.float()
    encoder0 = {k: v.clone() for k, v in b.encoder.state_dict().items()}
    with torch.no_grad():
        before = float(b.prior.rate(b.codes(h)))
    out = fit_prior(b, cache, steps=150, lr=3e-3)
    with torch.no_grad():
        after = float(b.prior.rate(b.codes(h)))
    assert out["steps"] == 150
    assert after < 0.8 * before
    # brute force: the fitted model costs at most a bit per value more than the codes'
    # empirical per-channel entropy
    q = b.codes(h).transpose(0, 1).reshape(3, -1)
    entropy = sum(float(-(p * p.log2()).sum()) for p in
                  (torch.unique(row, return_counts=True)[1].double() / row.numel() for row in q))
    per_channel = q.shape[1] // len(h)  # values of one channel per input
    assert after <= (entropy + 3 * 1.0) * per_channel  # within a bit per value
    assert after >= entropy * per_channel - 1e-3  # no model beats the empirical entropy
    for k, v in b.encoder.state_dict().items():
        assert torch.equal(v, encoder0[k]), k
    with pytest.raises(ModelError, match="entropy='factorized'"):
        fit_prior(build_bottleneck((2, 4, 6, 6), 3, 8, stride=1), cache, steps=1, lr=1e-3)


def test_a_rate_free_stage1_leaves_the_rate_to_stage2(one_thread):
    model, data = _task()
    cfg = npr.Split(at="bn1", channels=4, bits=8, stride=1, stage1_steps=60, stage2_steps=60,
                    lr=3e-3, train_head=False, stage2_trains=("encoder", "decoder", "tail"),
                    cache_head=True, tail_lr=3e-4, alpha=1.0, entropy="factorized",
                    rate=1e-4, stage1_rate=0.0, prior_steps=40)
    res = npr.compress(model, cfg, train=data, measure=False)
    record = res.report["steps"][0]
    assert record["stage1"]["steps"] == 60 and record["stage1"]["prior_fit"]["steps"] == 40
    assert _agreement(res.model, model, data) >= 0.85


def test_stage1_rate_settings_are_checked():
    with pytest.raises(RecipeError, match="cache_head=True"):
        npr.Split(stage1_rate=0.0, train_head=False)
    with pytest.raises(RecipeError, match="stage1_rate"):
        npr.Split(stage1_rate=-1.0, cache_head=True, train_head=False)
    with pytest.raises(RecipeError, match="prior_steps"):
        npr.Split(prior_steps=-1)
