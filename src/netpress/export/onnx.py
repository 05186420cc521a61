"""ONNX export with QDQ nodes, and ONNX Runtime helpers (latency, optimized op types).

:func:`export_onnx` writes a model as ONNX. A model quantized by ``npr.Quantize`` exports
with int8 per-channel weight initializers + ``DequantizeLinear`` and uint8
``QuantizeLinear``/``DequantizeLinear`` pairs on activations, which ONNX Runtime fuses into
integer kernels (QLinearConv, QGemm, QLinearAdd, ...); zero padding between two equal
quantizers is done on the integer codes, and layers left in float stay float in ONNX Runtime
(:mod:`netpress.export.int8_graph`). A float model exports as it is. The file is checked
with ``onnx.checker`` before it is written, and written atomically.

``onnx`` and ``onnxruntime`` are imported only when these functions run.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from netpress._atomic import atomic_path
from netpress.errors import ModelError

__all__ = ["export_onnx", "export_artefact", "ort_session", "ort_run", "ort_latency",
           "optimized_op_types", "OrtModule"]


class _KeywordInputs(nn.Module):
    """A model called with keyword inputs, taking them positionally (in ``names`` order) and
    returning its primary output, so the ONNX inputs keep the dict's names.

    ``ones_mask``: the model also gets ``attention_mask=ones_like(input_ids)`` (see
    :func:`_implicit_mask`)."""

    def __init__(self, model: nn.Module, names: Sequence[str], ones_mask: bool = False) -> None:
        super().__init__()
        self.model, self.names, self.ones_mask = model, tuple(names), ones_mask

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        from netpress._inputs import primary_output

        kwargs = dict(zip(self.names, inputs))
        if self.ones_mask:
            kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
        return primary_output(self.model(**kwargs))


def _implicit_mask(model: nn.Module, names: Sequence[str]) -> bool:
    """Whether the export passes an all-ones ``attention_mask`` built from ``input_ids``: for a
    ``transformers`` model given ``input_ids`` but no mask (a missing mask means "attend to
    every token", so outputs are the same). Without a mask its decoders look for packed
    sequences in the position ids, and the traced graph of that search is fixed to the
    example's batch size (ONNX Runtime fails at any other batch size)."""
    import inspect

    from netpress.models.hf import is_transformers_model

    if "input_ids" not in names or "attention_mask" in names \
            or not is_transformers_model(model):
        return False
    return "attention_mask" in inspect.signature(model.forward).parameters


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(
            isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise ModelError("export_onnx takes example_inputs as a tensor, a tuple of tensors or a "
                     f"dict of tensors (got {type(example_inputs).__name__})")


def _check_frozen(model: nn.Module) -> None:
    from netpress.quant.modules import ActQuant

    observing = [n for n, m in model.named_modules()
                 if isinstance(m, ActQuant) and m.observer is not None]
    if observing:
        raise ModelError(f"activation quantizers {observing[:4]} are still calibrating; "
                         "export the model that npr.Quantize returned")


def _integer_layers(model: nn.Module) -> dict[str, tuple[Any, Any]]:
    """``{name: (layer, its activation quantizer)}`` for the quantized layers fed by an
    activation quantizer: the layers ONNX Runtime runs as integer kernels."""
    from torch import fx

    from netpress.quant._insert import feeding_quant
    from netpress.quant.modules import QuantWeight

    if not isinstance(model, fx.GraphModule):
        return {}
    found = {name: (layer, feeding_quant(model, name)) for name, layer in model.named_modules()
             if isinstance(layer, QuantWeight)}
    return {name: pair for name, pair in found.items() if pair[1] is not None}


def _integer_biases(model: nn.Module) -> None:
    """Give each quantized layer fed by an activation quantizer its int32 bias grid."""
    for layer, aq in _integer_layers(model).values():
        if layer.bias is not None:
            layer.export_bias_step = (aq.scale * layer.weight_scale).detach()


_META_TARGET, _META_EXACT = "netpress.int8_target", "netpress.int8_exact_on"


def _target_metadata(model: nn.Module) -> dict[str, str]:
    """What the integer layers were quantized for, and the CPU kinds they compute exactly on
    (empty for a model without integer kernels)."""
    from netpress.quant.target import TARGETS, depthwise_layer, exact_on

    layers = [layer for layer, _ in _integer_layers(model).values()]
    if not layers:
        return {}
    made_for = sorted({str(layer.target) for layer in layers})
    exact = [cpu for cpu in TARGETS if all(
        exact_on(cpu, layer.weight_q, depthwise=depthwise_layer(layer))
        for layer in layers)]
    return {_META_TARGET: ",".join(made_for), _META_EXACT: ",".join(exact)}


def _warn_if_inexact(meta: dict[str, str], where: str) -> None:
    """Warn when this CPU's integer kernels would not compute what the model was made for."""
    from netpress.quant.target import TargetMismatchWarning, host_target

    if _META_EXACT not in meta:
        return
    host = host_target()
    if host in meta[_META_EXACT].split(","):
        return
    made_for = meta.get(_META_TARGET, "None")
    made = "an unknown target (an older netpress)" if made_for == "None" else \
        f"target {made_for!r}"
    warnings.warn(
        f"{where}: this INT8 model was quantized for {made}, but this CPU is {host!r}: "
        "ONNX Runtime's u8×s8 kernels here add pairs of products in 16 bits and saturate on "
        "its weights, so its predictions can differ from the fake-quant model's. Quantize "
        f"again with npr.Quantize(target={host!r}) (or target='generic' to run the same "
        "everywhere).", TargetMismatchWarning, stacklevel=3)


def _dynamic_axes(work: nn.Module, names: Sequence[str], inputs: tuple[torch.Tensor, ...],
                  batch: bool, sequence: bool) -> dict[str, dict[int, str]] | None:
    """The ONNX inputs' and output's free dimensions: the first (``batch``) of every one, and
    with ``sequence`` the second of every 2-D input (token ids, masks: ``(batch,
    sequence)``; ``decoder_*`` inputs of an encoder-decoder along a length of their own) and
    of the output when it runs along the sequence (``(batch, sequence, ...)`` logits or
    hidden states, seen on one forward of the example; the decoder's when there is one)."""
    if not batch:
        return None
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in [*names, "output"]}
    if not sequence:
        return axes
    # an encoder-decoder's decoder inputs run along their own length
    group = {n: "decoder_sequence" if n.startswith("decoder_") else "sequence" for n in names}
    lengths: dict[str, set[int]] = {}
    for name, t in zip(names, inputs):
        if t.dim() == 2:
            lengths.setdefault(group[name], set()).add(int(t.shape[1]))
    free = {g for g, n in lengths.items() if len(n) == 1}
    for name, t in zip(names, inputs):
        if t.dim() == 2 and group[name] in free:
            axes[name][1] = group[name]
    with torch.no_grad():
        out = work(*inputs)
    along = "decoder_sequence" if "decoder_sequence" in free else "sequence"
    if along in free and isinstance(out, torch.Tensor) and out.dim() >= 3 and \
            {int(out.shape[1])} == lengths[along]:
        axes["output"][1] = along
    return axes


def _export_or_refuse(run_export: Any, work: nn.Module, inputs: tuple[torch.Tensor, ...],
                      opset: int, skip: int) -> None:
    """Run ``run_export``; an exporter failure becomes a :class:`ModelError` naming the op
    and the module it is in (:mod:`netpress.export._refusal`) and saying what to do. A
    ``RuntimeError`` the model raises in PyTorch too is the model's own and is re-raised."""
    from netpress.export._refusal import (
        ModuleStack,
        op_module,
        refusal_message,
        scope_module,
        unsupported_op,
    )

    stack = ModuleStack(work, skip)
    try:
        with stack:
            run_export()
    except torch.onnx.errors.OnnxExporterError as exc:  # unsupported ops included
        reason, op = str(exc), unsupported_op(str(exc))
        module = scope_module(reason, skip) or (
            op_module(run_export, op, opset, skip) if op else None)
        raise ModelError(refusal_message(reason, op, module, _type_of(work, module, skip))
                         ) from None
    except (RuntimeError, AttributeError) as exc:  # the tracer's own failures (custom
        # autograd Functions, complex values used beyond what netpress splits, ...)
        module = stack.innermost()
        if module is None or not _runs_eagerly(work, inputs):
            raise
        reason = f"tracing the model failed ({type(exc).__name__}: {exc})"
        raise ModelError(refusal_message(reason, None, module, _type_of(work, module, skip))
                         ) from None


def _runs_eagerly(work: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``work`` runs on ``inputs`` in PyTorch (so a failure was the tracer's), in
    eval mode as exported (a failed export can leave it in training mode)."""
    work.eval()
    try:
        with torch.no_grad():
            work(*inputs)
    except Exception:
        return False
    return True


def _type_of(work: nn.Module, module: str | None, skip: int) -> str | None:
    """The class name of the user's module ``module`` inside ``work``."""
    if module is None:
        return None
    prefix = ["model"] if skip else []
    path = ".".join(prefix + ([] if module == "the model itself" else [module]))
    try:
        return type(work.get_submodule(path)).__name__
    except AttributeError:
        return None


def export_onnx(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, *,
                opset: int = 17, dynamic_batch: bool = True, dynamic_sequence: bool = True,
                nbits: str = "auto", nbits_accuracy: int = 0) -> Path:
    """Write ``model`` as ONNX (QDQ for quantized models) to ``path``; returns the path.

    ``example_inputs`` (a tensor, a tuple of tensors, or a dict of keyword inputs as
    ``transformers`` models take, whose keys become the ONNX input names) fixes the input
    shapes; with ``dynamic_batch`` the first dimension of every input and output is left
    free, and with ``dynamic_sequence`` too (dict inputs only) the second dimension of 2-D
    inputs such as ``input_ids`` and of an output running along them (any sequence length
    then runs; :func:`_dynamic_axes`). A model with dict inputs exports its primary output
    (``logits`` or ``last_hidden_state``); inputs it does not read are dropped from the graph. A
    ``transformers`` model given ``input_ids`` without ``attention_mask`` is exported with an
    all-ones mask computed from ``input_ids`` in the graph (what no mask means), so its graph
    holds at every batch size (:func:`_implicit_mask`).

    Group-quantized Linear layers (``GPTQ``) become ONNX Runtime's ``MatMulNBits`` where the
    installed ONNX Runtime runs it (``nbits="auto"``; ``"matmulnbits"`` insists,
    ``"dequantize"`` writes DequantizeLinear + MatMul); ``nbits_accuracy`` is its
    ``accuracy_level`` (0: float compute; 4: int8-quantized inputs, faster, less faithful).
    See :mod:`netpress.export.nbits`.
    """
    import onnx

    from netpress.export._count_moe import traceable_count_routing
    from netpress.export._moe import traceable_experts
    from netpress.export._symbolics import extra_symbolics
    from netpress.export._tied import share_copies
    from netpress.export._tracing import TracingRewrites
    from netpress.export.int8_graph import integer_pads, keep_float_layers
    from netpress.export.nbits import swap_for_export

    keyword = isinstance(example_inputs, Mapping)
    if keyword and not all(isinstance(t, torch.Tensor) for t in example_inputs.values()):
        raise ModelError("export_onnx: every value of dict example_inputs must be a tensor")
    inputs = tuple(example_inputs.values()) if keyword else _as_tuple(example_inputs)
    _check_frozen(model)
    meta = _target_metadata(model)
    _warn_if_inexact(meta, f"export_onnx({os.fspath(path)!r})")
    work = copy.deepcopy(model).eval()
    for m in work.modules():
        prepare = getattr(m, "prepare_export", None)
        if callable(prepare):
            prepare()
    swap_for_export(work, nbits, accuracy_level=nbits_accuracy)
    traceable_experts(work)
    traceable_count_routing(work)
    _integer_biases(work)
    names = [f"input_{i}" for i in range(len(inputs))] if len(inputs) > 1 else ["input"]
    if keyword:
        names = [str(k) for k in example_inputs]
        work = _KeywordInputs(work, names, _implicit_mask(work, names))
    axes = _dynamic_axes(work, names, inputs, dynamic_batch, keyword and dynamic_sequence)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        def run_export() -> None:
            with warnings.catch_warnings(), torch.no_grad(), extra_symbolics(opset), \
                    TracingRewrites():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(work, inputs, tmp, dynamo=False, opset_version=opset,
                                  input_names=names, output_names=["output"],
                                  dynamic_axes=axes, do_constant_folding=True)

        _export_or_refuse(run_export, work, inputs, opset, skip=1 if keyword else 0)
        proto = onnx.load(tmp)
        rewritten = integer_pads(proto) + keep_float_layers(proto) + share_copies(proto)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ModelError(f"the exported ONNX model fails onnx.checker: {exc}") from None
        if meta:
            onnx.helper.set_model_props(proto, meta)
        if meta or rewritten:
            onnx.save(proto, tmp)
    return target


def export_artefact(artefact: str | os.PathLike[str], path: str | os.PathLike[str],
                    input_shape: Sequence[int], *, opset: int = 17) -> Path:
    """Load a ``.npress`` artefact and write it as ONNX (the ``netpress export`` command).

    ``input_shape`` is one input's shape, batch first (e.g. ``(1, 3, 32, 32)``).
    """
    import netpress.quant  # noqa: F401  (registers quantized module types and encodings)
    from netpress.export.checkpoint import load_artefact

    if not input_shape or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise ModelError(f"input shape {tuple(input_shape)!r} must be positive sizes, batch "
                         "first")
    model = load_artefact(os.fspath(artefact)).model
    return export_onnx(model, path, torch.zeros(tuple(input_shape)), opset=opset)


def ort_session(path: str | os.PathLike[str], *, threads: int = 1,
                optimized_path: str | None = None) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (one inter-op thread).

    Warns (:class:`~netpress.quant.target.TargetMismatchWarning`) when ``path`` is an INT8
    model exported by netpress whose integer kernels would not compute exactly on this CPU.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = optimized_path
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    _warn_if_inexact(dict(session.get_modelmeta().custom_metadata_map), os.fspath(path))
    return session


def ort_run(session: Any, *inputs: torch.Tensor | np.ndarray,
            **named: torch.Tensor | np.ndarray) -> np.ndarray:
    """Run ``session`` on positional inputs (in the session's input order) or named inputs
    (names the graph does not take are skipped); the first output as a numpy array."""
    wanted = [i.name for i in session.get_inputs()]
    pairs = [*zip(wanted, inputs), *((k, v) for k, v in named.items() if k in wanted)]
    feed = {k: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
            for k, x in pairs}
    out = session.run(None, feed)[0]
    assert isinstance(out, np.ndarray)
    return out


class OrtModule(nn.Module):
    """An ONNX Runtime session behind ``nn.Module.forward``: positional tensor inputs in, the
    first output back as a CPU tensor. It lets ONNX Runtime models be evaluated and timed
    (:func:`netpress.measure.measure_latency_interleaved`) beside eager PyTorch ones."""

    def __init__(self, path: str | os.PathLike[str], *, threads: int = 1) -> None:
        super().__init__()
        self.session = ort_session(path, threads=threads)

    def forward(self, *inputs: torch.Tensor, **named: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(ort_run(self.session, *inputs, **named))


def optimized_op_types(path: str | os.PathLike[str]) -> list[str]:
    """The op types of the graph ONNX Runtime actually runs (after its optimizations)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        ort_session(path, optimized_path=out)
        return [n.op_type for n in onnx.load(out).graph.node]


def ort_latency(path: str | os.PathLike[str], example_input: torch.Tensor, *,
                threads: int = 1, batch_sizes: Sequence[int] = (1, 64), warmup: int = 3,
                repeats: int = 10) -> dict[int, dict[str, float]]:
    """Median ONNX Runtime latency per batch size, with the thread count fixed.

    Inputs are ``example_input``'s rows repeated to each batch size. Returns
    ``{batch: {"median_ms": ..., "per_sample_ms": ..., "throughput": samples/s}}``.
    """
    session = ort_session(path, threads=threads)
    row = example_input[:1].detach().cpu().numpy()
    out: dict[int, dict[str, float]] = {}
    for batch in batch_sizes:
        x = np.ascontiguousarray(np.repeat(row, batch, axis=0))
        for _ in range(warmup):
            ort_run(session, x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            ort_run(session, x)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        out[batch] = {"median_ms": median * 1e3, "per_sample_ms": median * 1e3 / batch,
                      "throughput": batch / median}
    return out
