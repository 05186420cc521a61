"""Word-level augmentation of distillation sentences: new inputs for the teacher to label.

A student distilled for many passes over a few thousand sentences fits those sentences better
than new ones (issue 13, seventh part: 1 - cosine 4x smaller on the sentences trained on, 1.8x
on held-out ones). :func:`augmented_pool` repeats the pool to the budget's sentence count and
replaces a share of the repeats by variants of them (the teacher labels every variant, so the
targets stay exact), the way task-specific distillation augments its data (TinyBERT, MixKD):

- ``crop``: a contiguous run of 40-90% of the words (at least 4);
- ``drop``: each word dropped with probability 0.15 (at least 4 kept);
- ``swap``: each word replaced, with probability 0.15, by a word of another pool sentence;
- ``pair``: the sentence followed by another pool sentence.

Pure functions of their arguments and the seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

KINDS = ("crop", "drop", "swap", "pair")


def variant(words: list[str], kind: str, other: list[str], rng: random.Random) -> list[str]:
    """One augmented copy of ``words`` (``other``: the words of another pool sentence)."""
    n = len(words)
    if kind == "crop":
        k = max(min(4, n), round(n * rng.uniform(0.4, 0.9)))
        i = rng.randrange(n - k + 1)
        return words[i:i + k]
    if kind == "drop":
        kept = [w for w in words if rng.random() >= 0.15]
        return kept if len(kept) >= min(4, n) else words
    if kind == "swap":
        return [rng.choice(other) if other and rng.random() < 0.15 else w for w in words]
    if kind == "pair":
        return words + other
    raise ValueError(f"augmentation kind {kind!r}: choose one of {', '.join(KINDS)}")


def augmented_pool(pool: Sequence[str], count: int, share: float = 0.5,
                   kinds: Sequence[str] = KINDS, seed: int = 3) -> list[str]:
    """``count`` sentences: the pool once as it is, then repeated, each repeat replaced with
    probability ``share`` by a :func:`variant` of a kind drawn uniformly from ``kinds``.
    With ``count <= len(pool)`` this is the pool's first ``count`` sentences."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share={share}: must be in [0, 1]")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"augmentation kinds {list(kinds)}: choose from {', '.join(KINDS)}")
    rng = random.Random(seed)
    out = list(pool[:count])
    while len(out) < count:
        for s in pool[:count - len(out)]:
            if rng.random() < share:
                other = pool[rng.randrange(len(pool))].split()
                s = " ".join(variant(s.split(), rng.choice(list(kinds)), other, rng))
            out.append(s)
    return out
