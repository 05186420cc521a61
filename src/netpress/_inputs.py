"""How netpress feeds inputs to a model.

Model inputs (``example_inputs`` and the first element of every data batch) may be:

* a tensor: ``model(x)``;
* a tuple or list: ``model(*x)``;
* a dict of keyword inputs, as ``transformers`` models take: ``model(**x)``.

These helpers are the single place that knows this convention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union, overload

import torch
from torch import nn

__all__ = [
    "Inputs",
    "call_model",
    "move_to",
    "batch_size_of",
    "take_batch",
    "repeat_to_batch",
    "primary_output",
    "input_spec",
    "token_mask",
    "real_tokens",
]

Inputs = Union[torch.Tensor, Sequence[Any], Mapping[str, Any]]  # noqa: UP007 (runtime alias)


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """Call ``model`` on ``inputs`` following the tensor / tuple / dict convention."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    raise TypeError(
        f"model inputs must be a tensor, a tuple/list of positional inputs or a dict of keyword "
        f"inputs, got {type(inputs).__name__}"
    )


def move_to(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor inside ``obj`` (tensor, tuple, list, dict) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(move_to(v, device) for v in obj)
    if isinstance(obj, list):
        return [move_to(v, device) for v in obj]
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def batch_size_of(inputs: Inputs) -> int:
    """The leading dimension of the first tensor in ``inputs``."""
    tensors = _tensors(inputs)
    if not tensors or tensors[0].dim() == 0:
        raise TypeError("cannot find a batched tensor in the model inputs")
    return int(tensors[0].shape[0])


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    return obj


def take_batch(inputs: Inputs, n: int) -> Any:
    """The first ``n`` rows of every batched tensor in ``inputs``."""
    return _map_tensors(inputs, lambda t: t[:n] if t.dim() > 0 else t)


def repeat_to_batch(inputs: Inputs, n: int) -> Any:
    """Inputs of batch size exactly ``n``, built by tiling (or cutting) the given rows."""
    size = batch_size_of(inputs)

    def tile(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != size:
            return t
        reps = -(-n // size)
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:n]

    return _map_tensors(inputs, tile)


def primary_output(output: Any) -> torch.Tensor:
    """The tensor that metrics compare: the output itself, ``logits``, or the first tensor.

    Handles plain tensors, tuples, dicts and ``transformers`` ``ModelOutput`` objects
    (``logits`` first, then ``last_hidden_state``).
    """
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        if isinstance(output, Mapping) and key in output:
            value = output[key]
        else:
            value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    tensors = _tensors(output)
    if not tensors:
        raise TypeError(f"the model returned no tensor (got {type(output).__name__})")
    return tensors[0]


def input_spec(inputs: Any) -> Any:
    """The shapes and dtypes of ``inputs``, JSON-ready, following the tensor / tuple / dict
    convention: ``{"shape": [...], "dtype": "float32"}`` per tensor, a list for a tuple,
    a dict for keyword inputs; ``None`` for no inputs or anything else."""
    if isinstance(inputs, torch.Tensor):
        return {"shape": list(inputs.shape), "dtype": str(inputs.dtype).removeprefix("torch.")}
    if isinstance(inputs, Mapping):
        return {str(k): input_spec(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return [input_spec(v) for v in inputs]
    return None


def token_mask(inputs: Any) -> torch.Tensor | None:
    """The real-token positions of a batch of text: its ``attention_mask`` (batch × tokens)
    as bools, or None (no mask, or not a 2-D mask: every input row counts)."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask.all()):
        return None
    return mask.bool()


@overload
def real_tokens(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor: ...
@overload
def real_tokens(x: None, keep: torch.Tensor | None) -> None: ...
@overload
def real_tokens(x: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor | None: ...


def real_tokens(x: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor | None:
    """The rows of a layer input ``x`` at real tokens: a token-major input (batch × tokens
    × d, or the same flattened to (batch · tokens) × d) loses the padding positions ``keep``
    marks False (:func:`token_mask`); any other shape (attention scores, pooled rows, conv
    maps) is returned as it is. Padding tokens are computed but never read by the model's
    output, so their inputs do not belong in a layer's statistics (with batches padded to a
    fixed length they can be most of them)."""
    if x is None or keep is None:
        return x
    if x.dim() == 3 and tuple(x.shape[:2]) == tuple(keep.shape):
        return x[keep]
    if x.dim() == 2 and x.shape[0] == keep.numel() and keep.shape[1] > 1:
        return x[keep.reshape(-1)]
    return x
