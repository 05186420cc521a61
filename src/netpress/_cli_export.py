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


def stored_input_shape(artefact: Path) -> tuple[int, ...] | None:
    """The example input shape recorded in the artefact's metadata (one tensor input)."""
    from netpress.export import read_header

    spec = (read_header(artefact).get("metadata") or {}).get("inputs")
    if isinstance(spec, dict) and isinstance(spec.get("shape"), list):
        shape = spec["shape"]
        if all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            return tuple(shape)
    return None


def recorded_source(artefact: Path) -> dict[str, Any]:
    """What ``netpress compress`` recorded about its reference and data (``report.json``'s
    ``source``) beside ``artefact``; ``{}`` when there is none."""
    path = artefact.parent / "report.json"
    try:
        source = json.loads(path.read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return {}
    return source if isinstance(source, dict) else {}


def _shape(args: argparse.Namespace) -> tuple[int, ...]:
    if args.input_shape is None:
        shape = stored_input_shape(args.artefact)
        if shape is None:
            raise DataError(f"{args.artefact} does not record its input shape; give "
                            f"--input-shape, one input's shape batch first, e.g. 1,3,32,32")
        return shape
    try:
        shape = tuple(int(d) for d in args.input_shape.split(","))
    except ValueError:
        raise DataError(f"--input-shape {args.input_shape!r}: give integers separated by "
                        f"commas, e.g. 1,3,32,32") from None
    if not shape or any(d < 1 for d in shape):
        raise DataError(f"--input-shape {args.input_shape!r}: sizes must be positive")
    return shape


def _check_fits(model: nn.Module, x: torch.Tensor, artefact: Path, given: bool) -> None:
    from netpress.measure.collect import explain_failure

    try:
        with torch.inference_mode():
            model(x)
        return
    except Exception as exc:
        why = explain_failure(model, x) or f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    stored = stored_input_shape(artefact)
    hint = (f"; the artefact was saved with input shape {','.join(map(str, stored))}"
            if stored is not None else "")
    what = "--input-shape" if given else "the stored input shape"
    raise DataError(f"{what} {','.join(map(str, x.shape))} does not fit {artefact.name}: "
                    f"{why}{hint}")


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


def _print_latency(paths: list[Path], x: torch.Tensor, args: argparse.Namespace,
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
    an embedding task keeps its threshold; anything else is classification."""
    from netpress.measure.tasks import ClassificationTask, EmbeddingTask

    try:
        report = json.loads((artefact.parent / "report.json").read_text(encoding="utf-8"))
        if report.get("task") == "embedding":
            return EmbeddingTask(float(report["fidelity"]["threshold"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return ClassificationTask()


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
    loaders = resolve_data(spec, eval_limit=limit, cwd=None if args.data else source.get("cwd"))
    return loaders.get("evaluate")


def run_export(args: argparse.Namespace) -> int:
    """Run ``netpress export`` with parsed ``args``."""
    import netpress.quant  # noqa: F401  (registers the quantized module types)
    from netpress.export.checkpoint import load_artefact
    from netpress.export.onnx import export_onnx
    from netpress.measure.deployed import float_twin

    shape = _shape(args)
    model = load_artefact(args.artefact).model.eval()
    x = torch.zeros(shape)
    _check_fits(model, x, args.artefact, given=args.input_shape is not None)
    path = export_onnx(model, args.onnx, x, opset=args.opset)
    print(f"wrote {path} (input shape {','.join(map(str, shape))})")
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
