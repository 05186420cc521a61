"""Data arguments: any re-iterable of ``(inputs, labels)`` batches.

A ``torch.utils.data.DataLoader`` qualifies, and so does a list of pairs. ``inputs`` follows
the convention of :mod:`netpress._inputs` (tensor, tuple, or dict of keyword inputs); labels
may be ``None``. These checks run before any method so bad data fails early with a message
that names the argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from netpress._inputs import call_model, move_to, primary_output
from netpress.errors import DataError

__all__ = ["Data", "batches", "first_batch", "check_data", "split_batch", "split_batches",
           "BatchSubset"]

Data = Iterable[Any]


def split_batch(batch: Any, *, name: str, index: int) -> tuple[Any, Any]:
    """``(inputs, labels)`` of one batch, or a DataError naming the argument and batch."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    kind = type(batch).__name__
    size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
    raise DataError(
        f"{name}: batch {index} is a {kind}{size}, not an (inputs, labels) pair; wrap your data "
        f"so each batch is (inputs, labels) (labels may be None)"
    )


def batches(data: Data, *, name: str) -> Iterator[tuple[Any, Any]]:
    """Iterate ``(inputs, labels)`` pairs, validating each; error if there are none."""
    count = 0
    for count, batch in enumerate(data, start=1):
        yield split_batch(batch, name=name, index=count - 1)
    if count == 0:
        raise DataError(f"{name}: the data yielded no batches; pass a non-empty DataLoader or list")


def first_batch(data: Data, *, name: str) -> tuple[Any, Any]:
    """The first ``(inputs, labels)`` batch of ``data``."""
    for pair in batches(data, name=name):
        return pair
    raise DataError(f"{name}: the data yielded no batches")  # pragma: no cover


def _seq2seq_hint(model: nn.Module, inputs: Any) -> str | None:
    """What to do when an encoder-decoder ``transformers`` model gets encoder inputs only
    (text data gives ``input_ids`` and ``attention_mask``), else None."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or not isinstance(inputs, Mapping) \
            or "decoder_input_ids" in inputs or "decoder_inputs_embeds" in inputs:
        return None
    return (f"{type(model).__name__} is an encoder-decoder model and these batches hold no "
            "decoder_input_ids: give batches that do (--data package.module:factory, or "
            "compress(..., calibration=...) in Python, with each batch a dict holding "
            "input_ids, attention_mask and decoder_input_ids), or compress its encoder "
            "alone (model.get_encoder())")


def check_data(name: str, data: Data, model: nn.Module, device: torch.device) -> None:
    """Fail early if ``data`` is not re-iterable, empty, malformed, or does not fit ``model``."""
    if not isinstance(data, Iterable):
        raise DataError(f"{name}: expected an iterable of (inputs, labels) batches, got "
                        f"{type(data).__name__}")
    if iter(data) is data:
        raise DataError(
            f"{name}: got a one-shot iterator ({type(data).__name__}); netpress reads data more "
            f"than once, so pass a DataLoader or a list of batches"
        )
    inputs, labels = first_batch(data, name=name)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = primary_output(call_model(model, move_to(inputs, device)))
    except Exception as exc:
        from netpress.measure.collect import explain_failure

        why = explain_failure(model, move_to(inputs, device))
        raise DataError(
            f"{name}: the model fails on the first batch ({_describe(inputs)}): "
            f"{why or f'{type(exc).__name__}: {exc}'}. "
            f"{_seq2seq_hint(model, inputs) or 'Check that this data fits the model'}"
        ) from exc
    finally:
        model.train(was_training)
    if isinstance(labels, torch.Tensor) and labels.dtype in (torch.int64, torch.int32, torch.int16,
                                                            torch.uint8) and out.dim() == 2:
        if labels.numel() and (int(labels.max()) >= out.shape[1] or int(labels.min()) < 0):
            raise DataError(
                f"{name}: labels range over [{int(labels.min())}, {int(labels.max())}] but the "
                f"model outputs {out.shape[1]} classes"
            )


def _describe(inputs: Any) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"tensor of shape {tuple(inputs.shape)}"
    if isinstance(inputs, dict):
        return "dict " + ", ".join(f"{k}: {_describe(v)}" for k, v in inputs.items())
    if isinstance(inputs, (tuple, list)):
        return "tuple (" + ", ".join(_describe(v) for v in inputs) + ")"
    return type(inputs).__name__


class BatchSubset:
    """A re-iterable view of the batches of ``data`` whose index passes ``keep``.

    Used to hold out a validation split of the train data without copying it.
    """

    def __init__(self, data: Data, every: int, *, held_out: bool) -> None:
        self.data, self.every, self.held_out = data, every, held_out

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.data):
            if (i % self.every == 0) == self.held_out:
                yield batch


def split_batches(data: Data, fraction: float) -> tuple[BatchSubset, BatchSubset]:
    """``(train, validation)``: every ``round(1/fraction)``-th batch is held out."""
    every = max(2, int(round(1.0 / fraction)))
    return BatchSubset(data, every, held_out=False), BatchSubset(data, every, held_out=True)
