import pytest
import torch
import torch.nn.functional as F

from netpress.recover.losses import cosine_loss, distillation_loss, feature_mse, kd_kl


def test_kd_is_zero_for_identical_logits_and_positive_otherwise():
    x = torch.randn(8, 5)
    assert kd_kl(x, x, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl(x, torch.randn(8, 5), 4.0).item() > 0


def test_kd_matches_definition():
    s, t, temp = torch.randn(4, 3), torch.randn(4, 3), 2.0
    p = F.softmax(t / temp, -1)
    expected = (p * (p.log() - F.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    assert kd_kl(s, t, temp).item() == pytest.approx(expected.item(), rel=1e-5)


def test_distillation_mixes_in_labels():
    s, t, y = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,))
    full = distillation_loss(s, t, y, temperature=3.0, alpha=0.25)
    expected = 0.25 * kd_kl(s, t, 3.0) + 0.75 * F.cross_entropy(s, y)
    assert full.item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(s, t, None, 3.0, 0.25).item() == pytest.approx(kd_kl(s, t, 3).item())


def test_feature_losses():
    a = torch.randn(3, 7)
    assert feature_mse(a, a).item() == 0
    assert cosine_loss(a, 2 * a).item() == pytest.approx(0.0, abs=1e-6)


def test_margin_hinge_is_zero_when_the_reference_class_wins_by_the_margin():
    from netpress.recover.losses import top1_margin_hinge

    teacher = torch.tensor([[5.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    safe = torch.tensor([[4.0, 1.0, 2.0], [0.0, 9.0, 1.0]])
    assert top1_margin_hinge(safe, teacher, margin=1.0).item() == 0.0
    flipped = torch.tensor([[1.0, 3.0, 0.0], [0.0, 9.0, 1.0]])  # row 0: 1 - 3 = -2 -> 3
    assert top1_margin_hinge(flipped, teacher, margin=1.0).item() == pytest.approx(1.5)


def test_label_preserving_loss_combines_its_terms():
    from netpress.recover.losses import (
        label_preserving_loss,
        reference_label_ce,
        top1_margin_hinge,
    )

    s, t = torch.randn(8, 5), torch.randn(8, 5)
    got = label_preserving_loss(s, t, ce_weight=0.5, kd_weight=2.0, margin_weight=3.0,
                                temperature=2.0, margin=0.5)
    want = (0.5 * reference_label_ce(s, t) + 2.0 * kd_kl(s, t, 2.0)
            + 3.0 * top1_margin_hinge(s, t, 0.5))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert reference_label_ce(s, t).item() == pytest.approx(
        F.cross_entropy(s, t.argmax(1)).item(), rel=1e-6)
