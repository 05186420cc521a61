"""The training loop's learning-rate schedules and Adam's ``beta2``: factors by hand, and a
recovery run whose optimizer steps follow them exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import netpress as npr
from netpress.errors import RecipeError
from netpress.recover.loop import _lr_lambda, _optimizer


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_factors_by_hand(schedule):
    cfg = npr.Distill(max_steps=10, warmup_steps=2, lr_schedule=schedule)
    f = _lr_lambda(cfg, 10)
    assert [f(0), f(1)] == [0.5, 1.0]  # warm-up: (step + 1) / warmup_steps
    for step in range(2, 10):
        done = (step - 2) / 8
        want = {"linear": 1 - done, "cosine": 0.5 * (1 + math.cos(math.pi * done)),
                "constant": 1.0}[schedule]
        assert f(step) == pytest.approx(want)
    if schedule != "constant":
        assert f(10) == pytest.approx(0.0)


def test_beta2_reaches_the_optimizer_and_is_checked():
    net = nn.Linear(3, 2)
    for name in ("adam", "adamw"):
        opt = _optimizer(net, npr.Distill(optimizer=name, beta2=0.98))
        assert opt.param_groups[0]["betas"] == (0.9, 0.98)
    assert _optimizer(net, npr.Distill()).param_groups[0]["betas"] == (0.9, 0.999)
    for bad in (1.0, -0.1, True, "0.9"):
        with pytest.raises(RecipeError, match="beta2"):
            npr.Distill(beta2=bad)
    with pytest.raises(RecipeError, match="lr_schedule"):
        npr.Distill(lr_schedule="step")


def test_linear_schedule_and_beta2_drive_the_adamw_steps():
    """Three AdamW steps of a FineTune with ``lr_schedule="linear"``, ``beta2=0.5``:
    the weights equal a hand-written AdamW with those betas and lr factors."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 4, generator=gen), torch.randint(0, 3, (5,), generator=gen))
            for _ in range(3)]
    cfg = npr.FineTune(max_steps=3, lr=0.1, optimizer="adamw", lr_schedule="linear",
                       warmup_steps=1, beta2=0.5, bn="frozen", dropout=False)
    res = npr.compress(net, [cfg], train=data, example_inputs=data[0][0], measure=False)
    ref = nn.Linear(4, 3)
    ref.load_state_dict(start)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.1, betas=(0.9, 0.5), weight_decay=0.0)
    factors = [1.0, 1.0, 0.5]  # warm-up 1 step, then 1 - (step - 1) / 2
    for (x, y), factor in zip(data, factors):
        for g in opt.param_groups:
            g["lr"] = 0.1 * factor
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(res.model.state_dict()[k], v)
