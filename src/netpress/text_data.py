"""Text data for ``transformers`` models: a file of texts, tokenized into padded batches.

``--data text:FILE`` on the command line (:func:`text_data`) reads

* a ``.txt`` file: one text per non-empty line;
* a ``.jsonl`` file: one JSON object per line with a ``"text"`` string and, optionally, an
  integer ``"label"`` on every line (sequence classifiers: accuracy beside agreement).

The texts are tokenized with the model's own tokenizer (read from a local directory, never
downloaded), truncated to ``max_length`` tokens and batched as dicts of ``input_ids`` and
``attention_mask`` padded to each batch's longest text, as netpress's text tasks take them
(padding never counts in their metrics or in calibration statistics). Batches hold texts of
similar length (sorted by length, then the batches shuffled by ``seed``), so little of each
batch is padding. For an encoder-decoder model (T5, Bart, ...) each batch also holds the
text shifted right as ``decoder_input_ids`` (teacher forcing: the decoder reconstructs the
text, and language-model fidelity is scored on its next-token predictions).

The split is by ``seed``: a held-out share (:data:`EVAL_SHARE`, at most :data:`EVAL_MAX`
texts, or ``eval_limit``) is the evaluation data; calibration takes up to
:data:`CALIBRATION_MAX` of the others and training all of them.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from netpress.errors import DataError

__all__ = ["CALIBRATION_MAX", "EVAL_MAX", "EVAL_SHARE", "decoder_inputs", "load_tokenizer",
           "read_texts", "text_data", "token_batches"]

#: Share of the texts held out for evaluation, and at most how many.
EVAL_SHARE = 0.2
EVAL_MAX = 1000
#: At most this many training texts are calibration data.
CALIBRATION_MAX = 512

Batch = tuple[dict[str, torch.Tensor], "torch.Tensor | None"]


def read_texts(path: str | os.PathLike[str]) -> tuple[list[str], list[int] | None]:
    """The texts of ``path`` (``.txt``: one per non-empty line; ``.jsonl``: ``"text"`` and an
    optional ``"label"`` per line) and their labels (None without labels)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text:{p}: no such file (give a .txt file with one text per line, or "
                        f"a .jsonl file with a 'text' per line)")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"text:{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if p.suffix != ".jsonl":
        plain = [line for line in lines if line.strip()]
        if not plain:
            raise DataError(f"text:{p}: the file holds no text")
        return plain, None
    texts: list[str] = []
    labels: list[int | None] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"text:{p}, line {number}: not JSON ({exc.msg})") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise DataError(f"text:{p}, line {number}: each line must be an object with a "
                            f"'text' string")
        texts.append(text)
        label = row.get("label")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool)):
            raise DataError(f"text:{p}, line {number}: 'label' must be an integer class")
        labels.append(label)
    if not texts:
        raise DataError(f"text:{p}: the file holds no text")
    known = [label for label in labels if label is not None]
    if known and len(known) < len(labels):
        raise DataError(f"text:{p}: {len(known)} of {len(labels)} lines have a 'label'; "
                        f"either every line has one or none does")
    return texts, known or None


def load_tokenizer(directory: str | os.PathLike[str]) -> Any:
    """The tokenizer saved in the local ``transformers`` directory ``directory`` (no hub
    access). One without a padding token pads with its end-of-sequence token, as decoder
    language models are usually batched (the attention mask marks the padding)."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory),
                                                               local_files_only=True)
    except Exception as exc:
        raise DataError(f"{directory}: no tokenizer could be read there ({type(exc).__name__}: "
                        f"{exc}); save the model's tokenizer into the directory or give "
                        f"--tokenizer DIR") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError(f"{directory}: the tokenizer has neither a padding nor an "
                            f"end-of-sequence token, so texts cannot be batched; set its "
                            f"pad_token and save it again")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def decoder_inputs(ids: torch.Tensor, mask: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
    """Teacher-forced decoder inputs for an encoder-decoder model reading its own text:
    ``decoder_input_ids`` are ``ids`` shifted right behind the ``start`` token (the logits
    at position ``t`` then predict token ``t`` of the text), with their attention mask."""
    first = torch.full((ids.shape[0], 1), start, dtype=ids.dtype)
    ones = torch.ones((mask.shape[0], 1), dtype=mask.dtype)
    return {"decoder_input_ids": torch.cat([first, ids[:, :-1]], dim=1),
            "decoder_attention_mask": torch.cat([ones, mask[:, :-1]], dim=1)}


def token_batches(tokenizer: Any, texts: Sequence[str], labels: Sequence[int] | None = None, *,
                  batch_size: int = 32, max_length: int = 128, seed: int = 0,
                  decoder_start: int | None = None) -> list[Batch]:
    """``(inputs, labels)`` batches of ``texts``: texts of similar token counts together,
    each batch padded to its longest text, the batches in an order shuffled by ``seed``.
    With ``decoder_start`` (an encoder-decoder model's decoder start token) each batch also
    holds :func:`decoder_inputs`."""
    if batch_size < 1 or max_length < 2:
        raise DataError(f"token_batches: batch_size={batch_size} must be >= 1 and "
                        f"max_length={max_length} >= 2")
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    out: list[Batch] = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        inputs = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, padding="longest",
                               return_tensors="pt", return_attention_mask=True)
        target = None if labels is None else torch.tensor([labels[i] for i in rows])
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if decoder_start is not None:
            batch.update(decoder_inputs(batch["input_ids"], batch["attention_mask"],
                                        decoder_start))
        out.append((batch, target))
    random.Random(seed).shuffle(out)
    return out


def text_data(path: str | os.PathLike[str], tokenizer: Any, *, batch_size: int = 32,
              max_length: int = 128, eval_limit: int | None = None,
              train_limit: int | None = None, seed: int = 0,
              decoder_start: int | None = None) -> dict[str, list[Batch]]:
    """``train``, ``calibration`` and ``evaluate`` batches of the text file ``path`` (see the
    module docs for the formats and the split; ``decoder_start``: see
    :func:`token_batches`)."""
    texts, labels = read_texts(path)
    if len(texts) < 2:
        raise DataError(f"text:{path}: {len(texts)} text; at least 2 are needed (one to "
                        f"calibrate or train on, one to evaluate)")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held = min(EVAL_MAX, max(1, round(EVAL_SHARE * len(texts))))
    if eval_limit is not None:
        held = max(1, min(held, eval_limit))
    rest = order[held:][:train_limit] if train_limit else order[held:]

    def batches(rows: list[int]) -> list[Batch]:
        return token_batches(tokenizer, [texts[i] for i in rows],
                             None if labels is None else [labels[i] for i in rows],
                             batch_size=batch_size, max_length=max_length, seed=seed,
                             decoder_start=decoder_start)

    return {"train": batches(rest), "calibration": batches(rest[:CALIBRATION_MAX]),
            "evaluate": batches(order[:held])}
