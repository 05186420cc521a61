"""Recovery methods: fine-tuning and knowledge distillation from the reference model.

Both run the shared loop in :mod:`netpress.recover.loop`, so pruning masks stay applied and
gradual-pruning ramps advance during them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netpress._inputs import call_model, move_to, take_batch
from netpress.config import check_fraction
from netpress.context import Context
from netpress.data import first_batch
from netpress.errors import DataError, RecipeError
from netpress.measure.collect import evaluating
from netpress.recover.features import feature_capture
from netpress.recover.loop import TrainConfig, train
from netpress.recover.losses import (
    cosine_loss,
    distillation_loss,
    feature_loss,
    feature_mse,
    similarity_loss,
)
from netpress.registry import register
from netpress.select import check_patterns

__all__ = ["FineTune", "Distill", "DISTILL_LOSSES", "distillation_kind"]

DISTILL_LOSSES = ("auto", "kl", "mse", "cosine")


@dataclass(frozen=True, kw_only=True)
class FineTune(TrainConfig):
    """Fine-tune on the labels of the ``train`` data (cross-entropy), keeping pruning masks."""

    def __post_init__(self) -> None:
        self._check_train()


@dataclass(frozen=True, kw_only=True)
class Distill(TrainConfig):
    """Knowledge distillation from the reference: soft targets at a temperature, plus labels.

    The loss is ``alpha * T^2 * KL(p_ref || p) + (1 - alpha) * CE(labels)`` for ``loss="kl"``
    (pure distillation when the data has no labels); ``"mse"`` and ``"cosine"`` match raw
    outputs instead, for regression and embedding models. ``"auto"`` (the default) is
    ``"cosine"`` for a model whose output is a hidden state (a ``transformers`` output with
    ``last_hidden_state`` and no ``logits``: an encoder such as all-MiniLM-L6-v2, whose
    hidden dimensions are no classes to soften) and ``"kl"`` otherwise
    (:func:`distillation_kind`); the report's step records which.

    ``features`` (module names or ``re:`` patterns, e.g. ``("re:layer\\d\\.\\d+$",)``
    for the blocks of a ResNet) adds ``feature_weight`` times the mean relative squared
    error between those modules' outputs in the model and in the reference: per-block
    targets, for compressed models whose block outputs keep their shapes. Like the output
    loss, it sees only the real tokens of text batches with an ``attention_mask``.

    ``pooled_weight`` adds that weight times ``1 - cos`` between the two models' outputs
    mean-pooled over the real tokens: the sentence embedding of an encoder such as
    all-MiniLM-L6-v2, which per-token losses only approximate. ``relation_weight`` adds
    that weight times :func:`~netpress.recover.losses.similarity_loss` of those pooled
    outputs: the batch's matrix of cosine similarities between sentences against the
    reference's (a relational term: it targets nearest-neighbour agreement directly).

    ``local=True`` (block-local distillation; needs ``features``, typically the blocks, e.g.
    ``("re:encoder\\.layer\\.\\d+$",)``): each of those modules computes on the
    reference's input to the same module instead of its own, so each compressed block learns
    to reproduce the original block from the original's input, all blocks independently (their
    errors do not compound during training; each optimizer step still counts once). Follow it
    with a short ordinary ``Distill`` so that the blocks also fit each other's outputs.

    For a pruned sentence encoder (all-MiniLM-L6-v2, BENCHMARKS.md issue 13) the most faithful
    recipe per optimizer step measured so far is ``loss="cosine", pooled_weight=1.0,
    dropout=False, optimizer="adamw"`` with batches of 64-128 sentences padded to the longest
    and ``lr=6e-4``, ``warmup_steps=25``: the step budget is spent best on large batches (batch
    64: +0.011 cosine in 50 steps; batch 16: +0.024 in 500; 500 steps at batch 64: +0.036 at lr
    2e-4, +0.038 at lr 3e-4; batch 128: +0.040 at lr 3e-4, +0.043 at lr 6e-4; more varied
    text and ``relation_weight`` did not help in 150-step screens; from ``FisherPrune()``'s
    target-following floor, lr 1e-3 reached 0.957 in 500 steps, the best measured).
    Batching sentences of similar length makes a step ~4x cheaper there (a random batch of
    64 is ~3.5x padding), and ``freeze=("embeddings",)`` skips the 11.7M word-embedding
    parameters that a heads/FFN pruning leaves unchanged.
    """

    temperature: float = 4.0
    alpha: float = 0.9
    loss: str = "auto"
    features: tuple[str, ...] = ()
    feature_weight: float = 1.0
    pooled_weight: float = 0.0
    relation_weight: float = 0.0
    local: bool = False

    def __post_init__(self) -> None:
        self._check_train()
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise RecipeError(f"Distill: temperature={self.temperature!r} must be > 0")
        check_fraction("Distill", "alpha", self.alpha, hi_open=False)
        if self.loss not in DISTILL_LOSSES:
            raise RecipeError(f"Distill: loss={self.loss!r}; choose one of {DISTILL_LOSSES}")
        check_patterns("Distill", features=self.features)
        for name in ("feature_weight", "pooled_weight", "relation_weight"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
                raise RecipeError(f"Distill: {name}={w!r} must be a number >= 0")
        if not isinstance(self.local, bool):
            raise RecipeError(f"Distill: local={self.local!r} must be true or false")
        if self.local and not self.features:
            raise RecipeError("Distill: local=True needs features=(the blocks to train "
                              "locally, names or 're:' patterns)")


@register(FineTune, kind="recover", needs=("train",))
def _apply_finetune(model: nn.Module, cfg: FineTune, ctx: Context) -> nn.Module:
    def loss(out: torch.Tensor, _teacher: torch.Tensor | None,
             labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            raise DataError("FineTune: the train data has no labels; use Distill instead")
        return F.cross_entropy(out.float(), labels.long())

    ctx.record("FineTune", **train(model, ctx, cfg, loss, needs_teacher=False))
    return model


def distillation_kind(reference: nn.Module, inputs: Any) -> str:
    """``"cosine"`` when ``reference`` returns a hidden state on ``inputs`` (an output
    object with ``last_hidden_state`` and no ``logits``), else ``"kl"`` (logits, or a
    plain tensor as classifiers return)."""
    if inputs is None:
        return "kl"
    with torch.no_grad(), evaluating(reference):
        out = call_model(reference, inputs)
    hidden = getattr(out, "last_hidden_state", None) is not None
    return "cosine" if hidden and getattr(out, "logits", None) is None else "kl"


@register(Distill, kind="recover", needs=("train",))
def _apply_distill(model: nn.Module, cfg: Distill, ctx: Context) -> nn.Module:
    kind = cfg.loss
    if kind == "auto":
        example = ctx.example_inputs
        if example is None:
            example = take_batch(first_batch(ctx.require("train", "Distill"), name="train")[0], 1)
        kind = distillation_kind(ctx.reference, move_to(example, ctx.device))

    def loss(out: torch.Tensor, teacher: torch.Tensor | None,
             labels: torch.Tensor | None) -> torch.Tensor:
        assert teacher is not None
        if kind == "mse":
            return feature_mse(out, teacher)
        if kind == "cosine":
            return cosine_loss(out, teacher)
        return distillation_loss(out, teacher, labels, cfg.temperature, cfg.alpha)

    pooled_terms = bool(cfg.pooled_weight or cfg.relation_weight)
    if not cfg.features and not pooled_terms:
        ctx.record("Distill", loss=kind, **train(model, ctx, cfg, loss, needs_teacher=True))
        return model
    with feature_capture(model, ctx.reference, cfg.features,
                         outputs=pooled_terms, local=cfg.local) as store:
        def with_features(out: torch.Tensor, teacher: torch.Tensor | None,
                          labels: torch.Tensor | None) -> torch.Tensor:
            total = loss(out, teacher, labels)
            if cfg.features:
                total = total + cfg.feature_weight * feature_loss(store.pairs()).to(out.device)
            pooled = store.pooled_output()
            if cfg.pooled_weight and pooled is not None:
                total = total + cfg.pooled_weight * cosine_loss(*pooled)
            if cfg.relation_weight and pooled is not None:
                total = total + cfg.relation_weight * similarity_loss(*pooled)
            return total

        ctx.record("Distill", loss=kind, features=len(store.names),
                   **train(model, ctx, cfg, with_features, needs_teacher=True))
    return model
