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
