"""Where the compressed model disagrees: flips, confidence shift and the long tail.

Pure functions on output tensors (logits ``[N, C]``, labels ``[N]``), like
:mod:`netpress.measure.fidelity`. The long-tail analysis asks whether the inputs whose top-1
prediction flipped are the *hard* ones, measuring difficulty by a per-example proxy taken
from the reference model: its top-1 margin or its loss on the label, or, on request, a
memorization estimate (Feldman & Zhang, "What Neural Networks Memorize and Why", 2020) from
a few models trained on random subsets (:func:`memorization_estimate` is the estimator,
:func:`feldman_memorization` trains the models). Every ``*_summary`` result is a JSON-ready
dict of plain ``int``/``float``/``list`` values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from netpress.errors import DataError
from netpress.measure.fidelity import _check_labels, _check_logits, _check_pair, _quantile

__all__ = [
    "class_churn",
    "confidence_shift",
    "feldman_memorization",
    "flipped_indices",
    "long_tail_summary",
    "memorization_estimate",
    "mismatch_by_difficulty",
    "rank_correlation",
    "ranks",
    "reference_loss",
    "reference_margin",
]

Proxy = Literal["margin", "loss", "memorization"]


def _pair(ref_logits: torch.Tensor, cmp_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ref = _check_logits(ref_logits, "reference logits")
    cmp = _check_logits(cmp_logits, "compressed logits")
    _check_pair(ref, cmp)
    return ref.detach().double().cpu(), cmp.detach().double().cpu()


def reference_margin(ref_logits: torch.Tensor, *, space: Literal["prob", "logit"] = "prob"
                     ) -> torch.Tensor:
    """Per-input top-1 minus top-2 score, ``[N]`` float64 (small margin = hard input).

    ``space="prob"`` uses softmax probabilities (a margin in ``[0, 1]``), ``"logit"`` the raw
    logits. With a single class the margin is the top-1 score itself.
    """
    logits = _check_logits(ref_logits, "reference logits").detach().double().cpu()
    if space not in ("prob", "logit"):
        raise DataError(f"margin space must be 'prob' or 'logit', got {space!r}")
    scores = logits.softmax(dim=-1) if space == "prob" else logits
    if scores.shape[1] == 1:
        return scores[:, 0]
    top = scores.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def reference_loss(ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-input cross-entropy of the reference on the true label, ``[N]`` float64."""
    logits = _check_logits(ref_logits, "reference logits").detach().double().cpu()
    labels = _check_labels(labels, logits.shape[0], logits.shape[1])
    return F.cross_entropy(logits, labels, reduction="none")


def memorization_estimate(correct: torch.Tensor, in_subset: torch.Tensor) -> torch.Tensor:
    """Feldman's per-example memorization from ``K`` models: ``[N]`` float64,
    ``P(correct | trained on it) - P(correct | not trained on it)``.

    ``correct`` and ``in_subset`` are ``[K, N]`` booleans: whether model ``k`` classifies
    example ``n`` correctly, and whether ``n`` was in model ``k``'s training subset. An
    example never (or always) held in is estimated from the side that exists (its missing
    probability counts as 0), so give each example both sides by using enough models.
    """
    if correct.shape != in_subset.shape or correct.dim() != 2:
        raise DataError(f"correct {tuple(correct.shape)} and in_subset "
                        f"{tuple(in_subset.shape)} must both be [models, examples]")
    hit, inside = correct.bool().double(), in_subset.bool()
    n_in = inside.double().sum(0)
    n_out = (~inside).double().sum(0)
    p_in = (hit * inside).sum(0) / n_in.clamp(min=1)
    p_out = (hit * ~inside).sum(0) / n_out.clamp(min=1)
    return p_in - p_out


Fit = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], None]


def _default_fit(epochs: int, lr: float, batch_size: int) -> Fit:
    def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> None:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(x.shape[0], generator=g).split(batch_size):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    return fit


def feldman_memorization(
    factory: Callable[[], nn.Module], inputs: torch.Tensor, labels: torch.Tensor, *,
    models: int = 8, subset_fraction: float = 0.7, epochs: int = 10, lr: float = 1e-3,
    batch_size: int = 64, seed: int = 0, fit: Fit | None = None,
) -> torch.Tensor:
    """Train ``models`` fresh models (``factory()``) on random ``subset_fraction`` subsets
    of ``(inputs, labels)`` and return :func:`memorization_estimate` per example, ``[N]``.

    ``fit(model, x, y, generator)`` trains one model (default: Adam, cross-entropy,
    ``epochs`` passes in batches of ``batch_size``). Use the result as the difficulty
    proxy of :func:`long_tail_summary` (``proxy="memorization"``); it needs the examples
    the fidelity is measured on to be these training examples.
    """
    n = int(labels.numel())
    if inputs.shape[0] != n or n < 2:
        raise DataError(f"need >= 2 inputs with one label each, got {inputs.shape[0]} inputs "
                        f"and {n} labels")
    if models < 2 or not 0.0 < subset_fraction < 1.0:
        raise DataError(f"need models >= 2 and 0 < subset_fraction < 1, got {models} and "
                        f"{subset_fraction}")
    g = torch.Generator().manual_seed(seed)
    train_one = fit or _default_fit(epochs, lr, batch_size)
    correct = torch.zeros(models, n, dtype=torch.bool)
    inside = torch.zeros(models, n, dtype=torch.bool)
    size = max(1, min(n - 1, int(round(subset_fraction * n))))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for k in range(models):
            chosen = torch.randperm(n, generator=g)[:size]
            inside[k, chosen] = True
            model = factory()
            train_one(model, inputs[chosen], labels[chosen], g)
            model.eval()
            with torch.inference_mode():
                pred = torch.cat([model(b).argmax(-1) for b in inputs.split(512)])
            correct[k] = pred.cpu() == labels.cpu()
    return memorization_estimate(correct, inside)


def flipped_indices(ref_logits: torch.Tensor, cmp_logits: torch.Tensor) -> torch.Tensor:
    """Indices (in data order) of the inputs whose top-1 class differs, ``LongTensor``."""
    ref, cmp = _pair(ref_logits, cmp_logits)
    return torch.nonzero(ref.argmax(-1) != cmp.argmax(-1)).reshape(-1)


def class_churn(ref_pred: torch.Tensor, cmp_pred: torch.Tensor, num_classes: int
                ) -> dict[str, list[int]]:
    """Per class ``c``: ``flips_out`` (reference said c, compressed something else) and
    ``flips_in`` (compressed says c, reference said something else), plus the reference's
    prediction count ``reference_count``. Lists of length ``num_classes``."""
    ref = _check_labels(ref_pred, int(ref_pred.numel()), num_classes)
    cmp = _check_labels(cmp_pred, int(cmp_pred.numel()), num_classes)
    _check_pair(ref, cmp, "predictions")
    moved = ref != cmp
    return {
        "reference_count": torch.bincount(ref, minlength=num_classes).tolist(),
        "flips_out": torch.bincount(ref[moved], minlength=num_classes).tolist(),
        "flips_in": torch.bincount(cmp[moved], minlength=num_classes).tolist(),
    }


def _histogram(values: torch.Tensor, bins: int) -> dict[str, list[float] | list[int]]:
    reach = float(values.abs().max()) if values.numel() else 0.0
    reach = reach if reach > 0 else 1e-6
    edges = torch.linspace(-reach, reach, bins + 1, dtype=torch.float64)
    counts = torch.histc(values, bins=bins, min=-reach, max=reach)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}


def confidence_shift(ref_logits: torch.Tensor, cmp_logits: torch.Tensor, *, bins: int = 30
                     ) -> dict[str, Any]:
    """How the probability of the reference's top-1 class moves under compression.

    Per input, ``shift = p_cmp[k] - p_ref[k]`` with ``k`` the reference's top-1 class
    (negative = the compressed model is less sure of the reference's answer). Returns
    ``mean``, ``mean_abs``, ``min``, ``p05``, ``median``, ``p95``, ``max``,
    ``share_decreased`` and ``histogram`` (``edges``: ``bins + 1`` floats symmetric around
    0, ``counts``: ``bins`` ints).
    """
    if bins < 1:
        raise DataError(f"bins must be at least 1, got {bins}")
    ref, cmp = _pair(ref_logits, cmp_logits)
    top = ref.argmax(-1, keepdim=True)
    shift = (cmp.softmax(-1).gather(1, top) - ref.softmax(-1).gather(1, top)).reshape(-1)
    return {
        "n": int(shift.numel()),
        "mean": float(shift.mean()),
        "mean_abs": float(shift.abs().mean()),
        "min": float(shift.min()),
        "p05": _quantile(shift, 0.05),
        "median": _quantile(shift, 0.5),
        "p95": _quantile(shift, 0.95),
        "max": float(shift.max()),
        "share_decreased": float((shift < 0).double().mean()),
        "histogram": _histogram(shift, bins),
    }


def ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties given their average rank (float64)."""
    flat = values.reshape(-1).double().cpu()
    _, inverse, counts = torch.unique(flat, sorted=True, return_inverse=True,
                                      return_counts=True)
    average = counts.cumsum(0).double() - (counts.double() - 1) / 2
    return average[inverse]


def rank_correlation(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); ``None`` if either is constant."""
    if x.numel() != y.numel():
        raise DataError(f"rank correlation needs equal sizes, got {x.numel()} and {y.numel()}")
    rx, ry = ranks(x), ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float((rx.square().sum() * ry.square().sum()).sqrt())
    if denom == 0.0:
        return None
    return max(-1.0, min(1.0, float((rx * ry).sum()) / denom))


def mismatch_by_difficulty(difficulty: torch.Tensor, mismatched: torch.Tensor, bins: int = 10
                           ) -> dict[str, Any]:
    """Mismatch rate per difficulty-quantile bin, easiest bin first.

    Inputs are sorted by ``difficulty`` (higher = harder) and split into ``bins``
    equal-count groups (``min(bins, N)``; the first groups take one more when N does not
    divide). Returns parallel lists ``low``/``high`` (difficulty range of each bin),
    ``count``, ``mismatches`` and ``rate``, and ``spearman``: the rank correlation between
    difficulty and the 0/1 mismatch indicator over all inputs (``None`` when either is
    constant; positive = flips concentrate on hard inputs).
    """
    diff = difficulty.reshape(-1).double().cpu()
    miss = mismatched.reshape(-1).cpu().bool()
    if diff.numel() != miss.numel():
        raise DataError(f"difficulty ({diff.numel()}) and mismatched ({miss.numel()}) differ "
                        f"in size")
    if diff.numel() == 0 or bins < 1:
        raise DataError(f"need at least one input and one bin, got {diff.numel()} and {bins}")
    if not bool(torch.isfinite(diff).all()):
        raise DataError("difficulty holds NaN/Inf values")
    order = torch.sort(diff, stable=True).indices
    groups = torch.tensor_split(order, min(bins, diff.numel()))
    out: dict[str, Any] = {"low": [], "high": [], "count": [], "mismatches": [], "rate": []}
    for g in groups:
        hits = int(miss[g].sum())
        out["low"].append(float(diff[g].min()))
        out["high"].append(float(diff[g].max()))
        out["count"].append(int(g.numel()))
        out["mismatches"].append(hits)
        out["rate"].append(hits / int(g.numel()))
    out["spearman"] = rank_correlation(diff, miss.double())
    return out


def long_tail_summary(ref_logits: torch.Tensor, cmp_logits: torch.Tensor,
                      labels: torch.Tensor | None = None, *, proxy: Proxy = "margin",
                      bins: int = 10, memorization: torch.Tensor | None = None
                      ) -> dict[str, Any]:
    """Mismatch rate against the reference's per-input difficulty, JSON-ready.

    ``proxy="margin"``: difficulty is ``-margin`` (the reference's top-1 minus top-2
    probability; small margin = hard); ``proxy="loss"``: the reference's cross-entropy on
    ``labels`` (needed); ``proxy="memorization"``: the given per-input ``memorization``
    estimate (see :func:`feldman_memorization`; high = memorized, atypical). Keys:
    ``proxy``, ``difficulty`` (what the numbers are), ``n``, ``mismatches``, ``spearman``
    and ``bins`` (see :func:`mismatch_by_difficulty`; bin ranges are in difficulty units),
    plus ``mismatch_rate_hardest`` / ``mismatch_rate_easiest`` (first and last bin) and
    ``proxy_mean_flipped`` / ``proxy_mean_kept`` (mean proxy value of flipped and unflipped
    inputs, proxy units).
    """
    ref, cmp = _pair(ref_logits, cmp_logits)
    if proxy == "margin":
        value = reference_margin(ref)
        difficulty, meaning = -value, "minus the reference's top-1 minus top-2 probability"
    elif proxy == "loss":
        if labels is None:
            raise DataError("proxy='loss' needs labels; use proxy='margin' for unlabeled data")
        value = reference_loss(ref, labels)
        difficulty, meaning = value, "the reference's cross-entropy on the label"
    elif proxy == "memorization":
        if memorization is None or memorization.numel() != ref.shape[0]:
            raise DataError(f"proxy='memorization' needs memorization= with one value per "
                            f"input ({ref.shape[0]}); compute it with feldman_memorization")
        value = memorization.reshape(-1).double().cpu()
        difficulty, meaning = value, "Feldman's memorization estimate (subset models)"
    else:
        raise DataError(f"proxy must be 'margin', 'loss' or 'memorization', got {proxy!r}")
    miss = ref.argmax(-1) != cmp.argmax(-1)
    table = mismatch_by_difficulty(difficulty, miss, bins)
    spearman = table.pop("spearman")
    n_miss = int(miss.sum())
    return {
        "proxy": proxy,
        "difficulty": meaning,
        "n": int(miss.numel()),
        "mismatches": n_miss,
        "spearman": spearman,
        "mismatch_rate_easiest": table["rate"][0],
        "mismatch_rate_hardest": table["rate"][-1],
        "proxy_mean_flipped": float(value[miss].mean()) if n_miss else None,
        "proxy_mean_kept": float(value[~miss].mean()) if n_miss < miss.numel() else None,
        "bins": table,
    }
