"""Fidelity for text models: language models, sentence encoders, sequence classifiers.

Batches are dicts of tensors (``input_ids``, ``attention_mask``, ...) and padding is respected:
only positions the attention mask marks as real count.

* **Language models** (:class:`LanguageModelTask`): perplexity of both models on the
  batches' own next tokens, next-token top-1 agreement with the reference, mean per-token
  KL(reference || compressed) and top-5 overlap. Logits are ``[batch, time, vocab]``; the
  prediction at position ``t`` is scored against token ``t + 1`` where both are real.
* **Encoders** (:class:`SentenceEmbeddingTask`): sentence embeddings (mean of the real
  tokens' hidden states, or the first token's), their cosine similarity to the reference's
  and retrieval agreement: the share of sentences whose nearest neighbour among the others
  stays the same.
* **Sequence classifiers**: :class:`~netpress.measure.tasks.ClassificationTask` on the
  ``logits`` (``[batch, classes]``, padding plays no part).

The maths are plain functions on tensors (:func:`next_token_sums`, :func:`lm_metrics`,
:func:`mean_pool`, :func:`retrieval_agreement`); the tasks run both models batch by batch
(``compare_models``), so full-vocabulary logits are never held for the whole data set.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from netpress._inputs import move_to, primary_output
from netpress.errors import DataError, RecipeError
from netpress.measure.collect import evaluating, run_checked
from netpress.measure.fidelity import cosine_similarity_stats, row_cosines

__all__ = [
    "LanguageModelTask",
    "SentenceEmbeddingTask",
    "next_token_sums",
    "lm_metrics",
    "mean_pool",
    "retrieval_agreement",
    "nearest_neighbours",
    "neighbour_margin",
    "text_batches",
]

_SUM_KEYS = ("tokens", "nll_reference", "nll_compressed", "agree", "kl", "top5")


def _decoder(inputs: Any, like: torch.Tensor) -> bool:
    """Whether ``like`` (logits ``[batch, time, ...]``) runs along an encoder-decoder batch's
    ``decoder_input_ids`` rather than its encoder ``input_ids``."""
    ids = inputs.get("decoder_input_ids") if isinstance(inputs, Mapping) else None
    return isinstance(ids, torch.Tensor) and ids.shape == like.shape[:2]


def _mask_of(inputs: Any, like: torch.Tensor) -> torch.Tensor:
    """The attention mask of a dict batch as bool ``[batch, time]`` (all real if absent);
    the decoder's when the logits run along the decoder inputs."""
    key = "decoder_attention_mask" if _decoder(inputs, like) else "attention_mask"
    mask = inputs.get(key) if isinstance(inputs, Mapping) else None
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask.to(like.device).bool()


def next_token_sums(ref_logits: torch.Tensor, cmp_logits: torch.Tensor, tokens: torch.Tensor,
                    mask: torch.Tensor | None = None, *, top_k: int = 5) -> dict[str, float]:
    """Sums over the scored positions of one batch (see :func:`lm_metrics`).

    ``*_logits`` are ``[B, T, V]``, ``tokens`` the ``[B, T]`` token ids the logits read (the
    targets are ``tokens[:, 1:]``; ids < 0 are ignored, as ``-100`` labels), ``mask`` the
    ``[B, T]`` attention mask. Position ``t`` counts when tokens ``t`` and ``t + 1`` are real.
    """
    if ref_logits.shape != cmp_logits.shape or ref_logits.dim() != 3:
        raise DataError(f"language-model logits must be [batch, time, vocab] of one shape, got "
                        f"{tuple(ref_logits.shape)} and {tuple(cmp_logits.shape)}")
    if tokens.shape != ref_logits.shape[:2]:
        raise DataError(f"token ids {tuple(tokens.shape)} do not match the logits "
                        f"{tuple(ref_logits.shape[:2])}")
    real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    target = tokens[:, 1:]
    valid = real[:, :-1] & real[:, 1:] & (target >= 0)
    r = ref_logits[:, :-1][valid].double().log_softmax(-1)
    c = cmp_logits[:, :-1][valid].double().log_softmax(-1)
    t = target[valid].long().unsqueeze(1)
    k = min(top_k, r.shape[-1])
    r_top, c_top = r.topk(k, dim=-1).indices, c.topk(k, dim=-1).indices
    overlap = (r_top.unsqueeze(2) == c_top.unsqueeze(1)).any(-1).double().sum(-1) / k
    return {"tokens": float(r.shape[0]),
            "nll_reference": float(-r.gather(1, t).sum()),
            "nll_compressed": float(-c.gather(1, t).sum()),
            "agree": float((r.argmax(-1) == c.argmax(-1)).double().sum()),
            "kl": float((r.exp() * (r - c)).sum()),
            "top5": float(overlap.sum())}


def lm_metrics(sums: Mapping[str, float]) -> dict[str, Any]:
    """Perplexities, next-token agreement, mean KL and top-5 overlap from summed batches."""
    n = sums.get("tokens", 0.0)
    if n <= 0:
        raise DataError("no token was scored: every batch is shorter than two real tokens "
                        "(check the attention masks)")
    ppl_ref = math.exp(sums["nll_reference"] / n)
    ppl_cmp = math.exp(sums["nll_compressed"] / n)
    return {"tokens": int(n), "perplexity_reference": ppl_ref, "perplexity_compressed": ppl_cmp,
            "perplexity_ratio": ppl_cmp / ppl_ref, "agreement": sums["agree"] / n,
            "kl_mean": sums["kl"] / n, "top5_overlap": sums["top5"] / n}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T, D]`` hidden states -> ``[B, D]``: the mean over real tokens."""
    if hidden.dim() == 2:
        return hidden
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    """For each row, the index of its most cosine-similar *other* row."""
    if emb.shape[0] < 2:
        raise DataError("retrieval agreement needs at least two embeddings")
    x = torch.nn.functional.normalize(emb.double(), dim=-1)
    sim = x @ x.T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(-1)


def neighbour_margin(emb: torch.Tensor) -> torch.Tensor:
    """For each row, how much more cosine-similar its nearest other row is than its second
    nearest (``>= 0``): rows with a small margin change neighbour (and so retrieval
    agreement) under a small perturbation of the embeddings."""
    if emb.shape[0] < 3:
        raise DataError("neighbour margins need at least three embeddings")
    x = torch.nn.functional.normalize(emb.double(), dim=-1)
    sim = x @ x.T
    sim.fill_diagonal_(-math.inf)
    top = sim.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def retrieval_agreement(ref_emb: torch.Tensor, cmp_emb: torch.Tensor) -> float:
    """Share of rows whose nearest neighbour among the others is the same in both sets."""
    return float((nearest_neighbours(ref_emb) == nearest_neighbours(cmp_emb)).double().mean())


def text_batches(reference: torch.nn.Module, compressed: torch.nn.Module, data: Iterable[Any],
                 *, device: torch.device | str = "cpu",
                 max_batches: int | None = None) -> Iterator[tuple[Any, Any, Any, Any]]:
    """``(reference_output, compressed_output, inputs, labels)`` per batch (raw outputs, on
    ``device``, without gradients, both models in eval mode)."""
    dev = torch.device(device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(evaluating(reference))
        stack.enter_context(evaluating(compressed))
        stack.enter_context(torch.inference_mode())
        for index, batch in enumerate(data):
            if max_batches is not None and index >= max_batches:
                return
            if not isinstance(batch, Sequence) or isinstance(batch, str) or len(batch) != 2:
                raise DataError(f"data batch {index} is not an (inputs, labels) pair; yield "
                                f"(inputs, labels) or (inputs, None) per batch")
            inputs = move_to(batch[0], dev)
            where = f"data batch {index}"
            yield (run_checked(reference, inputs, where), run_checked(compressed, inputs, where),
                   inputs, batch[1])


def _tokens_of(inputs: Any, labels: Any, logits: torch.Tensor) -> torch.Tensor:
    if isinstance(labels, torch.Tensor) and labels.shape == logits.shape[:2]:
        return labels.to(logits.device)
    key = "decoder_input_ids" if _decoder(inputs, logits) else "input_ids"
    ids = inputs.get(key) if isinstance(inputs, Mapping) else inputs
    if not isinstance(ids, torch.Tensor) or ids.shape != logits.shape[:2]:
        raise DataError("a language-model batch needs input_ids [batch, time] matching the "
                        "logits (or labels of that shape)")
    return ids


class LanguageModelTask:
    """Next-token fidelity of a causal language model (see the module docs).

    ``agreement`` is next-token top-1 agreement over the real positions.
    """

    name = "language_model"

    def compare(self, ref_outputs: torch.Tensor, cmp_outputs: torch.Tensor,
                labels: torch.Tensor | None) -> dict[str, Any]:
        """Metrics from already gathered ``[B, T, V]`` logits of unpadded batches;
        ``labels`` are the token ids (``[B, T]``)."""
        if labels is None:
            raise DataError("LanguageModelTask.compare needs the token ids as labels; "
                            "compare_models reads them from the batches")
        return lm_metrics(next_token_sums(ref_outputs, cmp_outputs, labels))

    def compare_models(self, reference: torch.nn.Module, compressed: torch.nn.Module,
                       data: Iterable[Any], *, device: torch.device | str = "cpu",
                       max_batches: int | None = None) -> tuple[dict[str, Any], int, Any]:
        """Run both models over ``data``: the metrics, the number of sequences and the first
        batch's inputs."""
        sums = dict.fromkeys(_SUM_KEYS, 0.0)
        n, first = 0, None
        for ref, cmp, inputs, labels in text_batches(reference, compressed, data,
                                                      device=device, max_batches=max_batches):
            r, c = primary_output(ref), primary_output(cmp)
            part = next_token_sums(r, c, _tokens_of(inputs, labels, r), _mask_of(inputs, r))
            for k in _SUM_KEYS:
                sums[k] += part[k]
            n += int(r.shape[0])
            first = inputs if first is None else first
        return lm_metrics(sums), n, first

    def headline(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        keys = ("perplexity_reference", "perplexity_compressed", "agreement", "kl_mean",
                "top5_overlap")
        return {k: float(metrics[k]) for k in keys if isinstance(metrics.get(k), (int, float))}

    def __repr__(self) -> str:
        return "LanguageModelTask()"


class SentenceEmbeddingTask:
    """Sentence-embedding fidelity of an encoder (see the module docs).

    ``pooling``: ``mean`` (over real tokens, as sentence-transformers' MiniLM) or ``cls``
    (the first token). ``agreement`` is retrieval agreement (nearest neighbour kept).
    """

    name = "sentence_embedding"

    def __init__(self, pooling: str = "mean") -> None:
        if pooling not in ("mean", "cls"):
            raise RecipeError(f"SentenceEmbeddingTask pooling={pooling!r}; use 'mean' or 'cls'")
        self.pooling = pooling

    def embed(self, output: Any, inputs: Any) -> torch.Tensor:
        """The ``[B, D]`` sentence embeddings of one batch's raw model output."""
        hidden = primary_output(output)
        if self.pooling == "cls" and hidden.dim() == 3:
            return hidden[:, 0].float()
        return mean_pool(hidden.float(), _mask_of(inputs, hidden) if hidden.dim() == 3 else None)

    def compare(self, ref_outputs: torch.Tensor, cmp_outputs: torch.Tensor,
                labels: torch.Tensor | None) -> dict[str, Any]:
        """Metrics from ``[N, D]`` sentence embeddings."""
        stats = cosine_similarity_stats(ref_outputs, cmp_outputs)
        cos = row_cosines(ref_outputs, cmp_outputs)
        return {"n": stats["n"], "cosine_mean": stats["mean"], "cosine_min": stats["min"],
                "cosine_p05": stats["p05"], "cosine_below_0.99": float((cos < 0.99).double()
                                                                      .mean()),
                "retrieval_agreement": retrieval_agreement(ref_outputs, cmp_outputs),
                "agreement": retrieval_agreement(ref_outputs, cmp_outputs)}

    def compare_models(self, reference: torch.nn.Module, compressed: torch.nn.Module,
                       data: Iterable[Any], *, device: torch.device | str = "cpu",
                       max_batches: int | None = None) -> tuple[dict[str, Any], int, Any]:
        """Embed every batch with both models (padding masked out), then compare."""
        refs: list[torch.Tensor] = []
        cmps: list[torch.Tensor] = []
        first = None
        for ref, cmp, inputs, _ in text_batches(reference, compressed, data, device=device,
                                                max_batches=max_batches):
            refs.append(self.embed(ref, inputs).cpu())
            cmps.append(self.embed(cmp, inputs).cpu())
            first = inputs if first is None else first
        if not refs:
            raise DataError("the data yielded no batches")
        r, c = torch.cat(refs), torch.cat(cmps)
        return self.compare(r, c, None), int(r.shape[0]), first

    def headline(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        keys = ("cosine_mean", "cosine_min", "retrieval_agreement")
        return {k: float(metrics[k]) for k in keys if isinstance(metrics.get(k), (int, float))}

    def __repr__(self) -> str:
        return f"SentenceEmbeddingTask(pooling={self.pooling!r})"
