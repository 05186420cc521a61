"""Recovery losses as pure functions of model outputs.

No modules, optimizers or data here: each function maps student outputs, teacher (reference)
outputs and labels to a scalar loss, and is tested on tiny tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_kl", "distillation_loss", "feature_mse", "cosine_loss"]


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton's soft-target loss: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``.

    Averaged over the batch (rows of 2-D logits; leading dims are flattened for 3-D+).
    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures.
    """
    c = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, c).float() / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, c).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """``alpha * kd_kl + (1 - alpha) * CE(labels)``; pure distillation when labels are None."""
    soft = kd_kl(student, teacher, temperature)
    if labels is None or alpha >= 1.0:
        return soft
    hard = F.cross_entropy(student.float(), labels.long())
    return alpha * soft + (1.0 - alpha) * hard


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between outputs, for regression or embedding models."""
    return F.mse_loss(student.float(), teacher.float())


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between output rows (last dim), averaged: for embedding models."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
