"""benchmarks/_text_augment.py: the word-level augmentation of distillation sentences."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from types import ModuleType

import pytest


def _module() -> ModuleType:
    path = Path(__file__).parents[1] / "benchmarks" / "_text_augment.py"
    spec = importlib.util.spec_from_file_location("_text_augment", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


aug = _module()
POOL = [" ".join(f"w{i}_{j}" for j in range(5 + i)) for i in range(12)]


def test_pool_once_then_repeats_varied_by_share() -> None:
    out = aug.augmented_pool(POOL, 60, share=0.5, seed=0)
    assert len(out) == 60 and out[:12] == POOL
    changed = sum(s != POOL[i % 12] for i, s in enumerate(out[12:]))
    assert 12 <= changed <= 36  # about half of the 48 repeats (binomial, p = 0.5)
    assert out == aug.augmented_pool(POOL, 60, share=0.5, seed=0)  # deterministic
    assert aug.augmented_pool(POOL, 30, share=0.0) == (POOL * 3)[:30]
    assert aug.augmented_pool(POOL, 5) == POOL[:5]


@pytest.mark.parametrize("kind", ["crop", "drop", "swap", "pair"])
def test_each_kind_keeps_its_words_in_bounds(kind: str) -> None:
    rng = random.Random(1)
    for _ in range(200):
        words = POOL[rng.randrange(12)].split()
        other = POOL[rng.randrange(12)].split()
        out = aug.variant(words, kind, other, rng)
        assert set(out) <= set(words) | set(other)
        if kind == "crop":
            assert min(4, len(words)) <= len(out) <= len(words)
            i = words.index(out[0])
            assert words[i:i + len(out)] == out  # contiguous
        elif kind == "drop":
            assert min(4, len(words)) <= len(out) <= len(words)
            assert [w for w in words if w in out] == out  # order kept
        elif kind == "swap":
            assert len(out) == len(words)
        else:
            assert out == words + other


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="share"):
        aug.augmented_pool(POOL, 20, share=1.5)
    with pytest.raises(ValueError, match="kinds"):
        aug.augmented_pool(POOL, 20, kinds=["shuffle"])
    with pytest.raises(ValueError, match="kind"):
        aug.variant(["a"], "shuffle", [], random.Random(0))
