"""Run models over data and gather their outputs for comparison.

A data argument is any iterable of ``(inputs, labels)`` batches (a ``DataLoader`` included);
inputs follow :mod:`netpress._inputs` (tensor, tuple or dict) and labels may be ``None``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from netpress._inputs import call_model, move_to, primary_output
from netpress.errors import DataError, ModelError, NetpressError

__all__ = [
    "collect_many",
    "collect_outputs",
    "collect_pair",
    "describe_inputs",
    "evaluating",
    "explain_failure",
    "model_device",
    "outputs_on",
    "run_checked",
]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore every submodule's own flag.

    The submodules are held by weak reference: a module the block replaces (GPTQ swaps each
    fitted layer for its codes) is freed at once, not kept with its weights to the end."""
    flags = [(weakref.ref(m), m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for ref, flag in flags:
            module = ref()
            if module is not None:
                module.training = flag


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def outputs_on(model: nn.Module, inputs: Iterable[Any]) -> torch.Tensor:
    """The primary outputs of ``model`` on each of ``inputs`` (moved to its device),
    concatenated along the batch dimension on the CPU as float32, without gradients.

    The plain form for a few held batches (sensitivity probes); :func:`collect_outputs`
    is the checked one for user data loaders.
    """
    device = model_device(model)
    with torch.no_grad():
        return torch.cat([primary_output(call_model(model, move_to(x, device))).float().cpu()
                          for x in inputs])


def describe_inputs(inputs: Any) -> str:
    """A short description of ``inputs`` naming every tensor's shape, for error messages."""
    if isinstance(inputs, torch.Tensor):
        return f"tensor{list(inputs.shape)} {str(inputs.dtype).removeprefix('torch.')}"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe_inputs(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(describe_inputs(v) for v in inputs) + ")"
    return type(inputs).__name__


def _first_tensor(args: Any) -> torch.Tensor | None:
    if isinstance(args, torch.Tensor):
        return args
    if isinstance(args, (tuple, list)) and args:
        return _first_tensor(args[0])
    return None


def _expectation(module: nn.Module, x: torch.Tensor) -> str | None:
    """What ``module`` expects of its input ``x``, when ``x`` visibly does not fit it."""
    in_features = getattr(module, "in_features", None)
    if isinstance(in_features, int) and x.dim() >= 1 and x.shape[-1] != in_features:
        return (f"expects {in_features} feature{'s' * (in_features != 1)} in the last "
                f"dimension, got {x.shape[-1]} (input shape {list(x.shape)})")
    channels = getattr(module, "in_channels", None)
    kernel = getattr(module, "kernel_size", None)
    if isinstance(channels, int) and kernel is not None:
        dims = len(kernel) if isinstance(kernel, (tuple, list)) else 1
        if x.dim() not in (dims + 1, dims + 2):
            return (f"expects a {dims + 2}-d input (batch, channels, {dims} spatial "
                    f"dimension{'s' * (dims != 1)}), got {x.dim()}-d shape {list(x.shape)}")
        got = x.shape[1] if x.dim() == dims + 2 else x.shape[0]
        if got != channels:
            return (f"expects {channels} channel{'s' * (channels != 1)}, got {got} "
                    f"(input shape {list(x.shape)})")
    return None


def explain_failure(model: nn.Module, inputs: Any) -> str | None:
    """Which layer ``model`` fails in on ``inputs`` and why, e.g. ``"layer 'conv1' (Conv2d)
    expects 1 channel, got 3 (input shape [1, 3, 32, 32])"``; ``None`` if it runs or the
    failing layer's expectation cannot be told. Runs the model once more, under hooks."""
    entered: list[tuple[str, nn.Module, Any]] = []

    def pre(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            entered.append((name, module, args))
        return hook

    def post(module: nn.Module, args: Any, output: Any) -> None:
        entered.pop()

    handles = [h for name, m in model.named_modules() if name
               for h in (m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post))]
    try:
        with torch.no_grad():
            call_model(model, inputs)
        return None
    except Exception:
        for name, module, args in reversed(entered):  # innermost first
            x = _first_tensor(args)
            why = None if x is None else _expectation(module, x)
            if why is not None:
                return f"layer {name!r} ({type(module).__name__}) {why}"
        return None
    finally:
        for handle in handles:
            handle.remove()


def run_checked(model: nn.Module, inputs: Any, where: str) -> Any:
    """``call_model(model, inputs)``, turning a failure into a :class:`DataError`.

    ``where`` names the inputs in the message (e.g. ``"batch 3"``); when the failing layer
    can be told (:func:`explain_failure`), the message names it and what it expects.
    """
    try:
        return call_model(model, inputs)
    except NetpressError:
        raise
    except Exception as exc:
        why = explain_failure(model, inputs)
        cause = why if why is not None else f"{type(exc).__name__}: {exc}"
        raise DataError(
            f"the data does not fit the model {type(model).__name__}: on {where}, {cause} "
            f"(inputs: {describe_inputs(inputs)}); check the input shapes, dtypes and the "
            f"(inputs, labels) batch convention"
        ) from exc


def _check_device(model: nn.Module, device: torch.device, which: str) -> None:
    if next(iter(model.parameters()), None) is None and next(iter(model.buffers()), None) is None:
        return
    actual = model_device(model)
    if actual.type != device.type or (device.index is not None and actual != device):
        raise ModelError(
            f"the {which} model is on {actual} but evaluation runs on {device}; move it with "
            f"model.to({str(device)!r}) or pass device={str(actual)!r}"
        )


def _batches(data: Iterable[Any], max_batches: int | None) -> Iterator[tuple[int, Any, Any]]:
    """``(index, inputs, labels)`` for each batch, validating the pair shape."""
    if data is None or not isinstance(data, Iterable):
        raise DataError(
            f"data must be an iterable of (inputs, labels) batches, got {type(data).__name__}"
        )
    if max_batches is not None and max_batches < 1:
        raise DataError(f"max_batches must be at least 1 (or None for all), got {max_batches}")
    for index, batch in enumerate(data):
        if max_batches is not None and index >= max_batches:
            return
        if not isinstance(batch, Sequence) or isinstance(batch, str) or len(batch) != 2:
            raise DataError(
                f"data batch {index} is not an (inputs, labels) pair (got "
                f"{describe_inputs(batch)}); yield (inputs, labels) or (inputs, None) per batch"
            )
        yield index, batch[0], batch[1]


def _labels_tensor(labels: Any, index: int) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"labels of data batch {index} are not a tensor of class indices "
            f"(got {type(labels).__name__}): {exc}"
        ) from exc
    return tensor.detach().cpu().reshape(-1) if tensor.dim() == 0 else tensor.detach().cpu()


def _concat(parts: list[torch.Tensor], what: str) -> torch.Tensor:
    try:
        return torch.cat(parts)
    except RuntimeError as exc:
        shapes = sorted({str(list(p.shape)) for p in parts})
        raise DataError(
            f"cannot concatenate the {what} of different batches (shapes {', '.join(shapes)}): "
            f"{exc}; pad inputs to one shape or use a FunctionTask over per-batch outputs"
        ) from exc


def _progress(total: int | None, description: str, enabled: bool) -> Any:
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import Progress

    progress = Progress(transient=True)
    progress.add_task(description, total=total)
    return progress


def _total(data: Any, max_batches: int | None) -> int | None:
    try:
        total: int | None = len(data)
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return total


def _output_of(model: nn.Module, inputs: Any, index: int) -> torch.Tensor:
    output = run_checked(model, inputs, f"data batch {index}")
    try:
        tensor = primary_output(output)
    except TypeError as exc:
        raise ModelError(
            f"model {type(model).__name__} returned no tensor on data batch {index} ({exc}); "
            f"it must return a tensor, a tuple/dict of tensors or an object with .logits"
        ) from exc
    return tensor.detach().float().cpu()


def _joined_labels(labels: list[torch.Tensor], unlabeled: list[int]) -> torch.Tensor | None:
    if labels and unlabeled:
        raise DataError(
            f"data batches {unlabeled[:5]} have labels None while others have labels; give "
            f"labels for every batch or for none"
        )
    return _concat(labels, "labels") if labels else None


def collect_many(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    *,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    progress: bool = False,
    description: str = "evaluating",
) -> tuple[list[torch.Tensor], torch.Tensor | None, Any]:
    """Run every model on the same batches in one pass over ``data``.

    Returns the concatenated primary outputs of each model (float32, CPU), the labels
    (``None`` when the batches carry none) and the first batch's inputs (as given).
    """
    dev = torch.device(device)
    names = ["reference", "compressed"] if len(models) == 2 else ["given"] * len(models)
    for model, which in zip(models, names):
        _check_device(model, dev, which)
    outputs: list[list[torch.Tensor]] = [[] for _ in models]
    labels: list[torch.Tensor] = []
    unlabeled: list[int] = []
    first_inputs: Any = None
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(evaluating(model))
        stack.enter_context(torch.inference_mode())
        bar = stack.enter_context(_progress(_total(data, max_batches), description, progress))
        for index, inputs, batch_labels in _batches(data, max_batches):
            first_inputs = inputs if index == 0 else first_inputs
            moved = move_to(inputs, dev)
            for model, out in zip(models, outputs):
                out.append(_output_of(model, moved, index))
            if batch_labels is None:
                unlabeled.append(index)
            else:
                labels.append(_labels_tensor(batch_labels, index))
            if bar is not None:
                bar.advance(bar.task_ids[0])
    if not outputs[0]:
        raise DataError(
            "the data yielded no batches; pass a non-empty iterable of (inputs, labels) batches "
            "(is the dataset or the split empty?)"
        )
    joined = [_concat(out, "model outputs") for out in outputs]
    return joined, _joined_labels(labels, unlabeled), first_inputs


def collect_outputs(
    model: nn.Module,
    data: Iterable[Any],
    *,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    progress: bool = False,
    description: str = "evaluating",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Outputs of ``model`` over ``data`` and the labels (``None`` if the data has none).

    The model runs in eval mode under ``torch.inference_mode()`` (its training flags are
    restored afterwards) and must already be on ``device``; inputs are moved there. Outputs
    are the :func:`~netpress._inputs.primary_output` of each batch, float32 on the CPU.
    At most ``max_batches`` batches are used. ``progress`` shows a transient rich bar.
    """
    outs, labels, _ = collect_many(
        [model], data, device=device, max_batches=max_batches, progress=progress,
        description=description,
    )
    return outs[0], labels


def collect_pair(
    reference: nn.Module,
    compressed: nn.Module,
    data: Iterable[Any],
    *,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    progress: bool = False,
    description: str = "evaluating",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(reference_outputs, compressed_outputs, labels)`` from one pass over ``data``.

    Both models see exactly the same batches, so a shuffling loader still pairs them.
    Otherwise as :func:`collect_outputs`.
    """
    (ref, cmp), labels, _ = collect_many(
        [reference, compressed], data, device=device, max_batches=max_batches,
        progress=progress, description=description,
    )
    return ref, cmp, labels
