"""Long-tail maths: margins, losses, flips, churn, confidence shift, ranks, difficulty bins."""

from __future__ import annotations

import json
import math

import pytest
import torch

from netpress.errors import DataError
from netpress.measure.longtail import (
    class_churn,
    confidence_shift,
    flipped_indices,
    long_tail_summary,
    mismatch_by_difficulty,
    rank_correlation,
    ranks,
    reference_loss,
    reference_margin,
)

# reference top-1: 0, 1, 0, 2; compressed top-1: 1, 1, 2, 2 -> inputs 0 and 2 flip
REF = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.5], [1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
CMP = torch.tensor([[0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])


def test_logit_margin_is_top1_minus_top2() -> None:
    assert reference_margin(REF, space="logit").tolist() == [2.0, 0.5, 1.0, 5.0]


def test_prob_margin_by_hand() -> None:
    e = math.e
    expected = (e - 1) / (e + 2)  # row [1, 0, 0]: p = e/(e+2), 1/(e+2)
    assert float(reference_margin(REF)[2]) == pytest.approx(expected)
    assert float(reference_margin(torch.tensor([[0.0, 0.0]]))[0]) == 0.0


def test_reference_loss_is_cross_entropy_on_label() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    loss = reference_loss(logits, torch.tensor([0, 1]))
    assert loss.tolist() == pytest.approx([math.log(2.0), math.log(4.0)])


def test_flipped_indices_and_churn() -> None:
    assert flipped_indices(REF, CMP).tolist() == [0, 2]
    churn = class_churn(REF.argmax(1), CMP.argmax(1), 3)
    assert churn == {"reference_count": [2, 1, 1], "flips_out": [2, 0, 0],
                     "flips_in": [0, 1, 1]}


def test_confidence_shift_by_hand() -> None:
    ref = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p(top-1) = 0.5, 0.75
    cmp = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # p(same class) = 0.75, 0.5
    s = confidence_shift(ref, cmp, bins=2)
    assert s["n"] == 2
    assert s["mean"] == pytest.approx(0.0, abs=1e-12)
    assert s["mean_abs"] == pytest.approx(0.25)
    assert s["min"] == pytest.approx(-0.25) and s["max"] == pytest.approx(0.25)
    assert s["median"] == pytest.approx(0.0, abs=1e-12)
    assert s["share_decreased"] == 0.5
    assert s["histogram"]["edges"] == pytest.approx([-0.25, 0.0, 0.25])
    assert s["histogram"]["counts"] == [1, 1]
    json.dumps(s, allow_nan=False)


def test_ranks_average_ties() -> None:
    assert ranks(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_rank_correlation_by_hand() -> None:
    # ranks x = [4, 1, 3, 2], ranks y = [3.5, 1.5, 3.5, 1.5]: 4 / sqrt(5 * 4)
    rho = rank_correlation(torch.tensor([4.0, 1.0, 3.0, 2.0]), torch.tensor([1.0, 0, 1, 0]))
    assert rho == pytest.approx(4 / math.sqrt(20))
    assert rank_correlation(torch.arange(5.0), torch.arange(5.0) ** 3) == pytest.approx(1.0)
    assert rank_correlation(torch.arange(5.0), -torch.arange(5.0)) == pytest.approx(-1.0)
    assert rank_correlation(torch.arange(4.0), torch.zeros(4)) is None


def test_mismatch_by_difficulty_bins_by_hand() -> None:
    table = mismatch_by_difficulty(torch.tensor([4.0, 1.0, 3.0, 2.0]),
                                   torch.tensor([True, False, True, False]), bins=2)
    assert table["low"] == [1.0, 3.0] and table["high"] == [2.0, 4.0]
    assert table["count"] == [2, 2] and table["mismatches"] == [0, 2]
    assert table["rate"] == [0.0, 1.0]
    assert table["spearman"] == pytest.approx(4 / math.sqrt(20))


def test_mismatch_by_difficulty_uneven_and_too_many_bins() -> None:
    table = mismatch_by_difficulty(torch.arange(5.0), torch.tensor([0, 0, 0, 0, 1]), bins=2)
    assert table["count"] == [3, 2] and table["rate"] == [0.0, 0.5]
    assert len(mismatch_by_difficulty(torch.arange(3.0), torch.zeros(3), bins=10)["rate"]) == 3
    with pytest.raises(DataError, match="differ in size"):
        mismatch_by_difficulty(torch.arange(3.0), torch.zeros(4))


def test_long_tail_flips_on_low_margin_inputs() -> None:
    # margins grow with the row index; the compressed model flips the two smallest margins
    ref = torch.tensor([[0.1 * (i + 1), 0.0] for i in range(8)])
    cmp = ref.clone()
    cmp[:2] = cmp[:2].flip(1)
    s = long_tail_summary(ref, cmp, proxy="margin", bins=4)
    json.dumps(s, allow_nan=False)
    assert s["n"] == 8 and s["mismatches"] == 2 and s["proxy"] == "margin"
    assert s["bins"]["rate"] == [0.0, 0.0, 0.0, 1.0]  # easiest bin first
    assert s["mismatch_rate_hardest"] == 1.0 and s["mismatch_rate_easiest"] == 0.0
    assert s["spearman"] is not None and s["spearman"] > 0.7
    assert s["proxy_mean_flipped"] < s["proxy_mean_kept"]


def test_long_tail_loss_proxy() -> None:
    labels = torch.tensor([0, 1, 0, 2])
    s = long_tail_summary(REF, CMP, labels, proxy="loss", bins=2)
    loss = reference_loss(REF, labels)
    assert s["bins"] == {k: v for k, v in mismatch_by_difficulty(
        loss, torch.tensor([True, False, True, False]), 2).items() if k != "spearman"}
    with pytest.raises(DataError, match="needs labels"):
        long_tail_summary(REF, CMP, None, proxy="loss")


def test_memorization_estimate_by_hand() -> None:
    from netpress.measure.longtail import memorization_estimate

    # 4 models, 3 examples. Example 0: right when held in (2/2), wrong when out (0/2) -> 1.
    # Example 1: always right -> 0. Example 2: right 1/2 in, 1/2 out -> 0.
    correct = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 1, 0], [0, 1, 0]], dtype=torch.bool)
    inside = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1], [0, 0, 0]], dtype=torch.bool)
    assert memorization_estimate(correct, inside).tolist() == pytest.approx([1.0, 0.0, 0.0])
    with pytest.raises(DataError, match="models, examples"):
        memorization_estimate(correct[0], inside[0])


def test_feldman_memorization_finds_mislabeled_examples() -> None:
    from torch import nn

    from netpress.measure.longtail import feldman_memorization

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    y = (x[:, 0] > 0).long()
    y[:10] = 1 - y[:10]  # atypical (mislabeled) examples: learned only when trained on

    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 2))

    mem = feldman_memorization(factory, x, y, models=4, subset_fraction=0.5, epochs=40,
                               lr=3e-2, batch_size=100, seed=0)
    assert mem.shape == (200,)
    assert float(mem[:10].mean()) > float(mem[10:].mean()) + 0.2
    # As the long-tail proxy: flips on the memorized examples give a positive correlation.
    ref = torch.nn.functional.one_hot(y, 2).double() * 3
    cmp = ref.clone()
    cmp[:10] = cmp[:10].flip(1)
    s = long_tail_summary(ref, cmp, proxy="memorization", memorization=mem, bins=4)
    assert s["proxy"] == "memorization" and s["mismatches"] == 10
    assert s["spearman"] is not None and s["spearman"] > 0.2
    with pytest.raises(DataError, match="needs memorization"):
        long_tail_summary(ref, cmp, proxy="memorization")
