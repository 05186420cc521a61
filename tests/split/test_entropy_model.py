"""The learned factorized entropy model of the split bottleneck: a proper pmf, a coder that
sends what the model says, and a rate term that trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import netpress as npr
from netpress.errors import DataError, RecipeError
from netpress.split.arith import decode_codes, encode_codes
from netpress.split.bottleneck import build_bottleneck
from netpress.split.entropy import (
    FactorizedPrior,
    code_model_from_pmf,
    code_pmf,
    interval_likelihood,
)
from netpress.split.measure import coded_codes, codes_of
from netpress.testing import TinyCNN, toy_batches


def test_interval_likelihood_is_the_sigmoid_difference_even_far_in_the_tails():
    lo = torch.tensor([-3.0, 0.0, 30.0, -40.0], dtype=torch.float64)
    hi = torch.tensor([1.0, 2.0, 31.0, -39.0], dtype=torch.float64)
    p = interval_likelihood(lo, hi)
    brute = torch.sigmoid(hi) - torch.sigmoid(lo)
    assert torch.allclose(p[:2], brute[:2])
    # 30..31: 1 - 1 in float32 would be 0; the mirrored form keeps the ~6e-14 mass
    exact = torch.exp(-torch.tensor(30.0, dtype=torch.float64)) * (1 - np.exp(-1.0))
    assert abs(float(p[2]) / float(exact) - 1) < 1e-3
    assert p.dtype == torch.float64 and bool((interval_likelihood(lo.float(), hi.float()) > 0)
                                             .all())


def test_the_cdf_is_increasing_and_the_pmf_sums_to_one():
    torch.manual_seed(0)
    prior = FactorizedPrior(channels=3, bits=4)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.1 * torch.randn_like(p))  # an arbitrary, trained-looking density
        x = torch.linspace(-20, 20, 401).expand(3, 1, -1)
        c = prior.cdf_logits(x)
    assert bool((c[..., 1:] > c[..., :-1]).all())
    pmf = prior.pmf()
    assert pmf.shape == (3, 16) and np.allclose(pmf.sum(axis=1), 1.0, atol=1e-12)
    assert pmf.min() >= 0
    # inner codes: the likelihood of the integer equals the pmf entry
    q = torch.arange(1, 15, dtype=torch.float32).view(1, 1, -1).expand(1, 3, -1)
    with torch.no_grad():
        lik = prior.likelihood(q).view(3, -1).double().numpy()
    assert np.allclose(lik, pmf[:, 1:15], atol=1e-6)


def test_code_pmf_folds_the_tails_into_the_end_codes():
    pmf = code_pmf(np.array([[0.1, 0.5, 0.95]]))
    assert np.allclose(pmf, [[0.1, 0.4, 0.45, 0.05]])


@pytest.mark.parametrize("seed", [0, 1])
def test_coded_length_matches_the_model_and_round_trips(seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    prior = FactorizedPrior(channels=4, bits=6)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pmf = prior.pmf()
    model = prior.code_model()
    for _ in range(5):
        codes = np.stack([rng.choice(64, (6, 5), p=row) for row in pmf]).astype(np.uint8)
        data = encode_codes(codes, model)
        assert np.array_equal(decode_codes(data, model, codes.shape), codes)
        ideal = -np.log2(pmf[np.arange(4)[:, None], codes.reshape(4, -1)]).sum()
        assert abs(len(data) - ideal / 8) < 2  # within a byte or so of sum -log2 p
        with torch.no_grad():
            trained = float(prior.rate(torch.from_numpy(codes[None].astype(np.float32))))
        inner = (codes > 0) & (codes < 63)  # the end codes carry the folded tails
        if inner.all():
            assert abs(trained - ideal) < 0.01 * ideal + 1


def test_code_model_from_pmf_checks_its_input():
    with pytest.raises(DataError, match="shape"):
        code_model_from_pmf(np.ones((2, 5)), bits=2)
    with pytest.raises(DataError, match="total_bits"):
        code_model_from_pmf(np.ones((2, 4)) / 4, bits=2, total_bits=40)
    model = code_model_from_pmf(np.array([[1.0, 0, 0, 0]]), bits=2)
    assert all(f >= 1 for f in np.diff(model.cum[0]))  # every code stays codable


def test_training_the_rate_fits_the_density_to_the_data():
    """Maximum likelihood of noisy samples: the rate of rounded samples approaches their
    empirical entropy (brute force over the histogram)."""
    torch.manual_seed(0)
    prior = FactorizedPrior(channels=2, bits=5)
    y = torch.stack([16 + 1.5 * torch.randn(1500), 10 + 4 * torch.rand(1500)], 0)
    y = y.clamp(0, 31).round().T.contiguous()  # (N, C)
    opt = torch.optim.Adam(prior.parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        loss = prior.noisy_bits(y) / 2
        loss.backward()
        opt.step()
    entropy = 0.0
    for c in range(2):
        counts = np.bincount(y[:, c].long().numpy(), minlength=32) / len(y)
        nz = counts[counts > 0]
        entropy -= float((nz * np.log2(nz)).sum())
    with torch.no_grad():
        rate = float(prior.rate(y))
    assert entropy <= rate + 1e-6 and rate < 1.05 * entropy


def _task() -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = TinyCNN(width=8).eval()
    with torch.no_grad():
        model.fc.weight.mul_(8)
    return model, toy_batches(n=256, batch=32, model=model)


def test_split_with_a_factorized_prior_trains_rate_and_codes_with_it(one_thread):
    model, data = _task()
    sizes = []
    for rate in (1e-5, 0.3):
        cfg = npr.Split(at="conv1", channels=6, bits=8, stride=1, stage1_steps=30,
                        stage2_steps=30, lr=3e-3, entropy="factorized", rate=rate,
                        alpha=1.0, stage2_trains=("encoder", "decoder", "tail"))
        res = npr.compress(model, cfg, train=data, evaluate=data,
                           example_inputs=data[0][0][:1])
        sec = res.report["split"]
        assert sec["entropy_model"] == "factorized"
        split = res.model
        codes = codes_of(split, data)
        coder, sent = coded_codes(split, codes)
        assert np.array_equal(decode_codes(encode_codes(codes[0], coder), coder,
                                           codes[0].shape), codes[0])
        ideal = np.array([coder.ideal_bits(c) / 8 for c in codes])
        assert np.all(np.abs(sent - ideal) <= 1.5)  # the bytes sent are the model's rate
        assert sec["bytes_per_input_arithmetic"]["mean"] == pytest.approx(sent.mean())
        sizes.append((res.report["agreement"], sent.mean()))
    assert sizes[0][0] >= 0.9
    assert sizes[1][1] < 0.8 * sizes[0][1], sizes  # a larger λ sends fewer bytes


def test_factorized_settings_are_checked():
    with pytest.raises(RecipeError, match="entropy"):
        npr.Split(entropy="hyperprior", rate=1e-3)
    with pytest.raises(RecipeError, match="rate > 0"):
        npr.Split(entropy="factorized")
    bn = build_bottleneck((2, 5, 12), channels=3, bits=4, entropy="factorized").train()
    bn(torch.randn(2, 5, 12))
    rate = bn.take_rate()
    assert rate is not None and rate.requires_grad and bn.take_rate() is None
    with pytest.raises(DataError, match="channels"):
        bn.prior.rate(torch.zeros(2, 5, 4))


def test_save_split_writes_the_code_model_both_sides_hold(tmp_path, one_thread):
    from netpress.split import save_split
    from netpress.split.arith import load_code_model

    model, data = _task()
    res = npr.compress(model, npr.Split(at="conv1", channels=3, bits=6, stride=2,
                                        stage1_steps=2, stage2_steps=2, entropy="factorized",
                                        rate=1e-3), train=data, measure=False)
    x = data[0][0][:2]
    paths = save_split(res.model, tmp_path, x, onnx=False)
    coder = load_code_model(paths["code_model"])
    assert coder == res.model.bottleneck.prior.code_model()
    codes = npr.load(paths["device"])(x)[0].numpy()
    assert np.array_equal(decode_codes(encode_codes(codes, coder), coder, codes.shape), codes)
    paths["code_model"].write_text('{"bits": 6, "cum": [[0, 5, 3]]}')
    with pytest.raises(DataError, match="code_model.json"):
        load_code_model(paths["code_model"])


def test_sequence_codes_are_coded_channel_first():
    from types import SimpleNamespace

    bn = build_bottleneck((2, 5, 12), channels=3, bits=4, entropy="factorized").eval()
    with torch.no_grad():
        codes = [c.numpy().astype(np.uint8) for c in bn.codes(torch.randn(2, 5, 12))]
    assert codes[0].shape == (5, 3)  # (L, C): channels last
    coder, sent = coded_codes(SimpleNamespace(bottleneck=bn), codes)  # type: ignore[arg-type]
    first = np.moveaxis(codes[0], -1, 0)
    assert sent[0] == len(encode_codes(first, coder))
    assert np.array_equal(decode_codes(encode_codes(first, coder), coder, first.shape), first)
