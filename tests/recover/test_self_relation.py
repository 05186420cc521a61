"""MiniLMv2 self-attention relation loss against a brute-force loop on tiny tensors."""

import math

import pytest
import torch

from netpress.recover.losses import self_relation_kl


def _brute(student, teacher, mask, heads):
    total = 0.0
    for s, t in zip(student, teacher):
        terms = []
        for b in range(mask.shape[0]):
            real = [i for i in range(mask.shape[1]) if mask[b, i]]
            for h in range(heads):
                def rel(x, i, h=h, b=b, real=real):
                    d = x.shape[-1] // heads
                    v = x[b, :, h * d:(h + 1) * d]
                    scores = [float(v[i] @ v[j]) / math.sqrt(d) for j in real]
                    z = math.log(sum(math.exp(a) for a in scores))
                    return [a - z for a in scores]
                for i in real:
                    ls, lt = rel(s, i), rel(t, i)
                    terms.append(sum(math.exp(a) * (a - c) for a, c in zip(lt, ls)))
        total += sum(terms) / len(terms)
    return total


def test_matches_brute_force_with_padding_and_different_widths():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    student = tuple(torch.randn(3, 4, 6) for _ in range(3))
    teacher = tuple(torch.randn(3, 4, 4) for _ in range(3))
    got = self_relation_kl(student, teacher, mask, heads=2)
    assert got.item() == pytest.approx(_brute(student, teacher, mask, 2), rel=1e-5)


def test_zero_for_equal_relations_and_padding_values_ignored():
    torch.manual_seed(1)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    t = (torch.randn(2, 3, 4),)
    assert self_relation_kl(t, t, mask, 2).item() == pytest.approx(0.0, abs=1e-6)
    s = (torch.randn(2, 3, 8),)
    moved = s[0].clone()
    moved[0, 2] = 100.0  # a padding token's vector: must not change the loss
    a, b = self_relation_kl(s, t, mask, 2), self_relation_kl((moved,), t, mask, 2)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_gradient_is_finite_with_padding():
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    s = torch.randn(2, 3, 4, requires_grad=True)
    self_relation_kl((s,), (torch.randn(2, 3, 4),), mask, 2).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert s.grad[0, 1:].abs().max() == 0  # padded tokens get no gradient


def test_bad_heads_and_lengths_raise():
    x = (torch.randn(1, 2, 6),)
    with pytest.raises(ValueError, match="divisible"):
        self_relation_kl(x, x, torch.ones(1, 2), 4)
    with pytest.raises(ValueError, match="same number"):
        self_relation_kl(x, x + x, torch.ones(1, 2), 2)
