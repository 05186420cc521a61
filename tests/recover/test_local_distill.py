"""Block-local distillation (``Distill(local=True)``): each block computes on the reference's
input to the same block, checked against a hand-written update on a tiny two-block model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netpress as npr
from netpress.errors import ModelError, RecipeError
from netpress.recover.losses import feature_loss


class _Two(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.block1 = nn.Linear(4, width)
        self.block2 = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(torch.tanh(self.block1(x)))


def _pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    student = _Two()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return student, teacher, torch.randn(8, 4)


def _step(student: nn.Module, teacher: nn.Module, x: torch.Tensor, **kw) -> nn.Module:
    cfg = npr.Distill(max_steps=1, lr=0.1, optimizer="sgd", momentum=0.0, loss="mse",
                      features=("block1", "block2"), feature_weight=2.0, **kw)
    return npr.compress(student, [cfg], reference=teacher, train=[(x, None)],
                        measure=False).model


def test_local_step_matches_brute_force():
    student, teacher, x = _pair()
    got = _step(student, teacher, x, local=True)
    # by hand: each student block on the teacher's input to that block
    manual = copy.deepcopy(student)
    with torch.no_grad():
        t1 = teacher.block1(x)
        t_in2 = torch.tanh(t1)
        t2 = teacher.block2(t_in2)
    s1, s2 = manual.block1(x), manual.block2(t_in2)
    loss = F.mse_loss(s2, t2) + 2.0 * feature_loss([(s1, t1), (s2, t2)])
    loss.backward()
    with torch.no_grad():
        for p in manual.parameters():
            p.sub_(0.1 * p.grad)
    for a, b in zip(got.parameters(), manual.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # and it is not the ordinary (global) update
    glob = _step(student, teacher, x)
    assert not torch.allclose(glob.block2.weight, got.block2.weight, atol=1e-4)


def test_local_blocks_are_independent_of_the_blocks_before():
    student, teacher, x = _pair()
    spoiled = copy.deepcopy(student)
    with torch.no_grad():
        spoiled.block1.weight.mul_(-3.0)  # a much worse first block
    a = _step(student, teacher, x, local=True)
    b = _step(spoiled, teacher, x, local=True)
    assert torch.allclose(a.block2.weight, b.block2.weight, atol=1e-6)
    assert torch.allclose(a.block2.bias, b.block2.bias, atol=1e-6)


def test_local_brings_every_block_closer():
    student, teacher, x = _pair()
    data = [(torch.randn(16, 4, generator=torch.Generator().manual_seed(s)), None)
            for s in range(4)]
    cfg = npr.Distill(max_steps=60, lr=3e-2, optimizer="adam", loss="mse", local=True,
                      features=("re:block\\d",), dropout=False)
    out = npr.compress(student, [cfg], reference=teacher, train=data, measure=False).model

    def err(m: nn.Module) -> float:
        with torch.no_grad():
            return float(feature_loss([(m.block1(x), teacher.block1(x))]))
    assert err(out) < 0.5 * err(student)


def test_local_needs_features_and_same_input_shapes():
    with pytest.raises(RecipeError, match="local"):
        npr.Distill(local=True)
    with pytest.raises(RecipeError, match="local"):
        npr.Distill(local=1, features=("x",))  # type: ignore[arg-type]
    cfg = npr.Distill(local=True, features=("block1",))
    assert npr.Distill.from_dict(cfg.to_dict()) == cfg
    student, teacher, x = _pair()
    narrow = _Two(width=6)
    narrow.block2 = nn.Linear(5, 3)
    narrow.block1 = nn.Linear(4, 5)
    with pytest.raises(ModelError, match="block2"):
        npr.compress(narrow, [npr.Distill(max_steps=1, local=True, features=("block2",))],
                     reference=teacher, train=[(x, None)], measure=False)
