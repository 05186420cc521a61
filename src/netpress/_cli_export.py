"""``netpress export``: a ``.npress`` artefact to ONNX, with the figures that matter deployed.

* The input shape comes from the artefact (``CompressionResult.save`` records the example
  inputs' shapes) unless ``--input-shape`` is given; a shape that does not fit the model is
  a one-line error naming the layer and what it expects.
* ``--latency`` times the exported model and the reference's FP32 export in ONNX Runtime,
  in alternating rounds, and prints the ratio.
* With evaluation data, the exported model's agreement with the reference is measured in
  ONNX Runtime, the runtime it is exported for.

The reference and the data are the ``--reference``/``--weights``/``--data`` given, or else
those that ``netpress compress`` recorded in ``report.json`` beside the artefact. Without a
reference, latency uses the artefact's own FP32 twin (same architecture, float weights).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netpress.errors import DataError, NetpressError

__all__ = ["recorded_source", "run_export", "stored_input_shape"]


def _stored_spec(artefact: Path) -> Any:
    from netpress.export import read_header

    return (read_header(artefact).get("metadata") or {}).get("inputs")


def _shape_of(spec: Any) -> tuple[int, ...] | None:
    if isinstance(spec, dict) and isinstance(spec.get("shape"), list):
        shape = spec["shape"]
        if all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            return tuple(shape)
    return None


def stored_input_shape(artefact: Path) -> tuple[int, ...] | None:
    """The example input shape recorded in the artefact's metadata (one tensor input)."""
    return _shape_of(_stored_spec(artefact))


def stored_keyword_inputs(artefact: Path) -> dict[str, torch.Tensor] | None:
    """Example keyword inputs (``transformers`` models: ``input_ids``, ``attention_mask``,
    ...) of the shapes and integer/float dtypes recorded in the artefact; masks are all
    ones (every token real), other inputs zeros. None when the artefact recorded no dict."""
    spec = _stored_spec(artefact)
    if not isinstance(spec, dict) or "shape" in spec or not spec:
        return None
    out: dict[str, torch.Tensor] = {}
    for name, part in spec.items():
        shape = _shape_of(part)
        dtype = getattr(torch, str(part.get("dtype")), None) if isinstance(part, dict) else None
        if shape is None or not isinstance(dtype, torch.dtype):
            return None
        fill = 1 if name.endswith("mask") else 0
        out[name] = torch.full(shape, fill, dtype=dtype)
    return out


def recorded_source(artefact: Path) -> dict[str, Any]:
    """What ``netpress compress`` recorded about its reference and data (``report.json``'s
    ``source``) beside ``artefact``; ``{}`` when there is none."""
    path = artefact.parent / "report.json"
    try:
        source = json.loads(path.read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return {}
    return source if isinstance(source, dict) else {}


def _example(args: argparse.Namespace) -> Any:
    """The example input to export with: ``--input-shape`` (a float tensor), else what the
    artefact recorded (a tensor, or keyword inputs for a ``transformers`` model)."""
    if args.input_shape is None:
        keywords = stored_keyword_inputs(args.artefact)
        if args.sequence_length is not None and args.sequence_length < 1:
            raise DataError(f"--sequence-length {args.sequence_length}: give a token count "
                            f">= 1")
        if keywords is not None and args.sequence_length:
            keywords = {k: torch.full((1, args.sequence_length), int(v.flatten()[0]),
                                      dtype=v.dtype) if v.dim() == 2 else v
                        for k, v in keywords.items()}
        if keywords is not None:
            return keywords
        shape = stored_input_shape(args.artefact)
        if shape is None:
            raise DataError(f"{args.artefact} does not record its input shape; give "
                            f"--input-shape, one input's shape batch first, e.g. 1,3,32,32")
        return torch.zeros(shape)
    return torch.zeros(_shape(args))


def _describe(x: Any) -> str:
    if isinstance(x, dict):
        return ", ".join(f"{k} {','.join(map(str, v.shape))}" for k, v in x.items())
    return ",".join(map(str, x.shape))


def _shape(args: argparse.Namespace) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in args.input_shape.split(","))
    except ValueError:
        raise DataError(f"--input-shape {args.input_shape!r}: give integers separated by "
                        f"commas, e.g. 1,3,32,32") from None
    if not shape or any(d < 1 for d in shape):
        raise DataError(f"--input-shape {args.input_shape!r}: sizes must be positive")
    return shape


def _check_fits(model: nn.Module, x: Any, artefact: Path, given: bool) -> None:
    from netpress._inputs import call_model
    from netpress.measure.collect import explain_failure

    try:
        with torch.inference_mode():
            call_model(model, x)
        return
    except Exception as exc:
        why = explain_failure(model, x) or f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    stored = stored_input_shape(artefact)
    hint = (f"; the artefact was saved with input shape {','.join(map(str, stored))}"
            if stored is not None else "")
    what = "--input-shape" if given else "the stored input shape"
    raise DataError(f"{what} {_describe(x)} does not fit {artefact.name}: {why}{hint}")


def _reference(args: argparse.Namespace, source: dict[str, Any]) -> tuple[nn.Module | None, str]:
    from netpress._cli_specs import resolve_model, state_fingerprint

    spec = args.reference or source.get("model")
    weights = args.weights if args.reference else (args.weights or source.get("weights"))
    if spec is None:
        return None, ""
    if args.reference:
        return resolve_model(spec, weights), f"{spec} (--reference)"
    try:
        model = resolve_model(spec, weights, cwd=source.get("cwd"))
    except NetpressError as exc:
        print(f"note: cannot rebuild the reference recorded in report.json ({exc})")
        return None, ""
    if state_fingerprint(model) != source.get("reference_sha256"):
        print(f"note: the reference recorded in report.json ({spec}) rebuilds with other "
              f"weights than compress used (no --weights file?); pass --reference and "
              f"--weights to compare against the original")
        return None, ""
    return model, f"{spec} (from report.json)"


def _print_latency(paths: list[Path], x: Any, args: argparse.Namespace,
                   ref_label: str) -> None:
    from netpress.measure.deployed import onnx_latency

    sizes = (1, args.latency_batch_size)
    ref, cmp = onnx_latency(paths, x, batch_sizes=sizes, threads=args.threads,
                            repeats=args.repeats)
    print(f"ONNX Runtime latency, {args.threads} thread(s), median of {args.repeats} runs; "
          f"reference = {ref_label}; both timed in alternating rounds:")
    for bs in sorted(ref):
        r, c = ref[bs].median_ms, cmp[bs].median_ms
        ratio = r / c if c else float("nan")
        print(f"  batch {bs}: reference {r:.3f} ms, compressed {c:.3f} ms "
              f"({bs / c * 1000 if c else 0:.1f} inputs/s): {ratio:.2f}x the reference's speed")


def _recorded_task(artefact: Path) -> Any:
    """The task ``netpress compress`` measured with (``report.json`` beside ``artefact``):
    the ``--task`` it recorded (text tasks included), else an embedding task with its
    threshold; anything else is classification."""
    from netpress.errors import RecipeError
    from netpress.measure.tasks import ClassificationTask, EmbeddingTask, as_task

    try:
        report = json.loads((artefact.parent / "report.json").read_text(encoding="utf-8"))
        named = (report.get("source") or {}).get("task")
        if isinstance(named, str):
            return as_task(named)
        if report.get("task") == "embedding":
            return EmbeddingTask(float(report["fidelity"]["threshold"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecipeError):
        pass
    return ClassificationTask()


def _text_fidelity(task: Any, onnx_path: Path, model: nn.Module, reference: nn.Module | None,
                   data: Any, args: argparse.Namespace) -> None:
    """The text tasks' figures (cosine and retrieval, or next-token agreement) of the
    exported model against the reference and against the eager compressed model."""
    from netpress.export.onnx import OrtModule
    from netpress.measure.text import SentenceEmbeddingTask

    exported = OrtModule(onnx_path, threads=args.threads)
    keys = ("cosine_mean", "retrieval_agreement") if isinstance(task, SentenceEmbeddingTask) \
        else ("agreement", "kl_mean")

    def figures(base: nn.Module) -> str:
        metrics, n, _ = task.compare_models(base, exported, data)
        return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys) + f" on {n} texts"

    if reference is not None:
        print(f"exported model in ONNX Runtime vs the reference: {figures(reference)}")
    print(f"exported model vs the eager compressed model: {figures(model)}")


def _figures(task: Any, ref: torch.Tensor, out: torch.Tensor) -> str:
    metrics = task.compare(ref, out, None)
    if "cosine_mean" in metrics:
        return (f"cosine mean {metrics['cosine_mean']:.4f}, rows with cosine ≥ "
                f"{metrics['threshold']:g}: {100 * metrics['agreement']:.2f}%")
    return f"agreement {100 * metrics['agreement']:.2f}%"


def _print_fidelity(onnx_path: Path, model: nn.Module, reference: nn.Module | None,
                    data: Any, args: argparse.Namespace) -> None:
    from netpress.export.onnx import OrtModule
    from netpress.measure.collect import collect_many, collect_outputs
    from netpress.measure.fidelity import accuracy

    task = _recorded_task(args.artefact)
    if hasattr(task, "compare_models"):  # text: batches of other lengths, pooled or per token
        _text_fidelity(task, onnx_path, model, reference, data, args)
        return
    eager = [m for m in (reference, model) if m is not None]
    outs, labels, _ = collect_many(eager, data, progress=not args.no_progress,
                                   description="evaluating the eager models")
    exported, _ = collect_outputs(OrtModule(onnx_path, threads=args.threads), data,
                                  progress=not args.no_progress,
                                  description="evaluating the ONNX export in ONNX Runtime")
    n = int(exported.shape[0])
    acc = "" if labels is None or exported.dim() != 2 else \
        f"; top-1 accuracy {100 * accuracy(exported, labels):.2f}%"
    if reference is not None:
        print(f"exported model in ONNX Runtime, on {n} evaluation inputs: "
              f"{_figures(task, outs[0], exported)} with the reference (eager compressed "
              f"model: {_figures(task, outs[0], outs[1])}){acc}")
    print(f"exported model vs the eager compressed model: {_figures(task, outs[-1], exported)}"
          f" on {n} inputs")


def _data(args: argparse.Namespace, source: dict[str, Any]) -> Any:
    from netpress._cli_specs import resolve_data

    spec = args.data or source.get("data")
    if spec is None:
        return None
    limit = args.eval_limit if args.data else (args.eval_limit or source.get("eval_limit"))
    loaders = resolve_data(spec, eval_limit=limit, cwd=None if args.data else source.get("cwd"),
                           model_spec=args.reference or source.get("model"),
                           tokenizer=source.get("tokenizer"),
                           max_length=int(source.get("max_length") or 128),
                           seed=int(source.get("seed") or 0))
    return loaders.get("evaluate")


def run_export(args: argparse.Namespace) -> int:
    """Run ``netpress export`` with parsed ``args``."""
    import netpress.quant  # noqa: F401  (registers the quantized module types)
    from netpress.export.checkpoint import load_artefact
    from netpress.export.onnx import export_onnx
    from netpress.measure.deployed import float_twin

    x = _example(args)
    model = load_artefact(args.artefact).model.eval()
    _check_fits(model, x, args.artefact, given=args.input_shape is not None)
    path = export_onnx(model, args.onnx, x, opset=args.opset)
    free = " (batch and sequence length free)" if isinstance(x, dict) else ""
    print(f"wrote {path} (input shape {_describe(x)}{free})")
    source = recorded_source(args.artefact)
    needs_reference = args.latency or args.data or source.get("data")
    reference, label = _reference(args, source) if needs_reference else (None, "")
    data = _data(args, source)
    if data is not None:
        _print_fidelity(path, model, reference, data, args)
    if args.latency:
        if reference is None:
            reference, label = float_twin(model), ("the FP32 twin of this artefact (same "
                                                   "architecture; pass --reference for the "
                                                   "original model)")
        with tempfile.TemporaryDirectory(prefix="netpress-export-") as tmp:
            ref_path = export_onnx(reference, Path(tmp) / "reference.onnx", x, opset=args.opset)
            _print_latency([ref_path, path], x, args, f"{label}, FP32 ONNX export")
    return 0
