"""Recovery losses as pure functions of model outputs.

No modules, optimizers or data here: each function maps student outputs, teacher (reference)
outputs and labels to a scalar loss, and is tested on tiny tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "kd_kl",
    "distillation_loss",
    "feature_mse",
    "cosine_loss",
    "reference_label_ce",
    "top1_margin_hinge",
    "label_preserving_loss",
    "feature_loss",
    "real_tokens",
    "mean_pool",
    "similarity_loss",
    "self_relation_kl",
]


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


def reference_label_ce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the labels the reference predicts (its top-1)."""
    return F.cross_entropy(student.float(), teacher.argmax(-1))


def top1_margin_hinge(student: torch.Tensor, teacher: torch.Tensor,
                      margin: float = 1.0) -> torch.Tensor:
    """Penalise inputs where the student's logit for the reference's top-1 class does not beat
    every other logit by ``margin``: ``mean(relu(margin - (s[y_ref] - max_{j != y_ref} s[j])))``.

    Zero once the student predicts the reference's class with a margin, so it pushes only on
    the inputs at risk of a mismatch.
    """
    s = student.float()
    ref = teacher.argmax(-1, keepdim=True)
    own = s.gather(-1, ref).squeeze(-1)
    others = s.scatter(-1, ref, float("-inf")).amax(-1)
    return F.relu(margin - (own - others)).mean()


def label_preserving_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    margin_weight: float = 1.0,
    temperature: float = 4.0,
    margin: float = 1.0,
) -> torch.Tensor:
    """The label-preserving objective: CE on the reference's labels + distillation + a hinge
    on the reference's top-1 margin, weighted."""
    loss = student.new_zeros((), dtype=torch.float32)
    if ce_weight:
        loss = loss + ce_weight * reference_label_ce(student, teacher)
    if kd_weight:
        loss = loss + kd_weight * kd_kl(student, teacher, temperature)
    if margin_weight:
        loss = loss + margin_weight * top1_margin_hinge(student, teacher, margin)
    return loss


def feature_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over ``(student, teacher)`` feature pairs of ``‖s - t‖² / ‖t‖²`` (the relative
    squared error, so blocks of different scale weigh alike); 0 for no pairs."""
    if not pairs:
        return torch.zeros(())
    terms = [((s.float() - t.float()) ** 2).sum() / (t.float() ** 2).sum().clamp_min(1e-12)
             for s, t in pairs]
    return torch.stack(terms).mean()


def real_tokens(mask: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor | None,
                labels: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token outputs reduced to the rows of real tokens, so that losses ignore padding.

    When ``student`` is ``[batch, time, ...]`` with the ``[batch, time]`` of ``mask`` (an
    attention mask, nonzero at real tokens), it, ``teacher`` and per-token ``labels``
    (``[batch, time]``) become ``[n, ...]`` (the real tokens, in order); otherwise (pooled
    outputs, logits per sequence) everything is returned unchanged."""
    real = mask.bool().to(student.device)
    if student.dim() < 3 or student.shape[:2] != real.shape:
        return student, teacher, labels

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return t[real] if t is not None and t.shape[:2] == real.shape else t

    return student[real], rows(teacher), rows(labels)


def mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[batch, time, ...]`` averaged over the time steps where ``mask`` ([batch, time]) is
    nonzero: mean pooling of token states into sentence embeddings, padding left out."""
    m = mask.to(device=x.device, dtype=x.dtype).reshape(*mask.shape, *[1] * (x.dim() - 2))
    return (x * m).sum(1) / m.sum(1).clamp_min(1)


def similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relational distillation over a batch of embeddings (rows, ``[batch, dim]``): the mean
    over the ordered pairs ``i != j`` of ``(cos(s_i, s_j) - cos(t_i, t_j))^2``, i.e. the
    student's matrix of cosine similarities between the batch's rows against the
    reference's. It targets what nearest-neighbour retrieval reads (which row is closest to
    which), which a per-row ``1 - cos`` only bounds. 0 for fewer than two rows."""
    n = student.shape[0]
    if n < 2:
        return student.new_zeros((), dtype=torch.float32)
    s = F.normalize(student.reshape(n, -1).float(), dim=-1)
    t = F.normalize(teacher.reshape(n, -1).float(), dim=-1)
    diff = s @ s.T - t @ t.T
    off = ~torch.eye(n, dtype=torch.bool, device=diff.device)
    return (diff[off] ** 2).mean()


def self_relation_kl(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                     mask: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLMv2's self-attention relation distillation (Wang et al. 2021) for one layer.

    ``student`` and ``teacher`` are matching tuples of per-token vectors ``[batch, time,
    width]`` (e.g. the layer's queries, keys and values; the widths may differ between the
    two models, e.g. after head pruning). Each vector is split into ``heads`` relation heads
    of ``width / heads`` dims; per head the relation ``softmax(x x^T / sqrt(width / heads))``
    over the real tokens (``mask`` ``[batch, time]``, nonzero at real tokens) is a
    distribution per query token. Returns the sum over the tuple of ``KL(teacher || student)``
    averaged over batch, relation heads and real query tokens."""
    if len(student) != len(teacher) or not student:
        raise ValueError("self_relation_kl: give the same number (>= 1) of student and "
                         f"teacher tensors (got {len(student)} and {len(teacher)})")
    real = mask.bool().to(student[0].device)
    keys = real[:, None, None, :]  # [b, 1, 1, time]: which tokens may be attended to
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher):
        for x in (s, t):
            if x.shape[-1] % heads:
                raise ValueError(f"self_relation_kl: width {x.shape[-1]} is not divisible "
                                 f"by {heads} relation heads; choose heads dividing both")
        log_s, log_t = (_relation(x.float(), keys, heads) for x in (s, t))
        kl = (log_t.exp() * (log_t - log_s)).masked_fill(~keys, 0.0).sum(-1)  # [b, h, time]
        rows = real[:, None, :].expand_as(kl)
        total = total + kl[rows].mean()
    return total


def _relation(x: torch.Tensor, keys: torch.Tensor, heads: int) -> torch.Tensor:
    """Log-softmax relation ``[batch, heads, time, time]`` of ``x`` ``[batch, time, width]``."""
    b, n, w = x.shape
    h = x.reshape(b, n, heads, w // heads).transpose(1, 2)
    scores = h @ h.transpose(-1, -2) / math.sqrt(w // heads)
    # a finite fill: padded keys get probability 0 without NaN gradients (0 * inf)
    return torch.log_softmax(scores.masked_fill(~keys, -1e30), dim=-1)
