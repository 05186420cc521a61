"""Where the INT8 ResNets spend their time in ONNX Runtime, against FP32 and ``quantize_static``.

For each depth (default ResNet-20 and ResNet-56), with the same JPEG calibration images as
``benchmarks/quantization.py``:

* ORT FP32 (the float model exported by netpress, default graph optimizations: NCHWc);
* netpress ``Quantize()`` (target auto) exported as it is now;
* the same quantized model exported without the INT8 graph rewrites of
  :mod:`netpress.export.int8_graph` (what the export wrote before them);
* ONNX Runtime's ``quantize_static`` U8S8 per channel (QDQ, MinMax).

All sessions run with one thread, default (``ORT_ENABLE_ALL``) optimizations, batch 64. The
throughput of every model is timed in interleaved rounds (:func:`measure_latency_interleaved`);
the per-op profile (``SessionOptions.enable_profiling``) is also gathered in interleaved
rounds, and reported as median milliseconds per run of each op type and of each stage of
convolutions (stem, stages 1–3, by output width). The two netpress exports are checked to
compute identical logits on ``--check-images`` JPEG test images (the rewrites are exact).

    python benchmarks/int8_profile.py --data ../shared/data [--depths 20 56]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import data_dir, markdown_table
from quantization import depth_parser, ort_logits, ort_quantize_static, run_depths

import netpress as npr
import netpress.export.int8_graph as int8_graph
from netpress import datasets as ds
from netpress.export.onnx import OrtModule, export_onnx, optimized_op_types
from netpress.measure import measure_latency_interleaved
from netpress.models.cifar_resnet import find_pretrained, load_pretrained_cifar_resnet
from netpress.quant import Quantize
from netpress.quant.target import cpu_flags, host_target


@contextmanager
def _without_rewrites() -> Any:
    """Export as before :mod:`netpress.export.int8_graph` (its rewrites switched off)."""
    saved = int8_graph.integer_pads, int8_graph.keep_float_layers
    int8_graph.integer_pads = int8_graph.keep_float_layers = lambda model: 0  # type: ignore
    try:
        yield
    finally:
        int8_graph.integer_pads, int8_graph.keep_float_layers = saved


def _profiling_session(path: Path, prefix: str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_profiling, opts.profile_file_prefix = True, prefix
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _conv_stage(shape: list[int] | None) -> str:
    """The stage of a conv from its output shape (NCHW, NCHWc or NHWC: dim 2 is spatial)."""
    if not shape or len(shape) < 4:
        return "?"
    return {32: "stage 1 (32×32)", 16: "stage 2 (16×16)", 8: "stage 3 (8×8)"}.get(
        shape[2], f"{shape[2]}×{shape[2]}")


def profile(paths: list[Path], x: np.ndarray, rounds: int, repeats: int, tmp: Path,
            ) -> list[dict[str, dict[str, float]]]:
    """Median ms per run of each op type, and of the convolutions of each stage."""
    sessions = [_profiling_session(p, str(tmp / f"prof{i}")) for i, p in enumerate(paths)]
    for s in sessions:
        s.run(None, {s.get_inputs()[0].name: x})
    for r in range(rounds):  # the order rotates: no model always follows the same one
        for s in sessions[r % len(sessions):] + sessions[:r % len(sessions)]:
            for _ in range(repeats + 1):  # the first run of each visit is not counted
                s.run(None, {s.get_inputs()[0].name: x})
    out = []
    for s in sessions:
        events = json.loads(Path(s.end_profiling()).read_text())
        runs: list[collections.Counter[str]] = []
        stages: list[collections.Counter[str]] = []
        runs_ms: list[float] = []
        for e in events:
            if e.get("cat") == "Session" and e["name"] == "model_run":
                runs_ms.append(e["dur"] / 1e3)
                runs.append(collections.Counter())
                stages.append(collections.Counter())
            elif e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and runs:
                op = e["args"]["op_name"]
                runs[-1][op] += e["dur"]
                if "Conv" in op:
                    shape = e["args"].get("output_type_shape", [{}])[0]
                    dims = next(iter(shape.values()), None) if isinstance(shape, dict) else None
                    first = "stem" if stages[-1]["_seen"] == 0 else _conv_stage(dims)
                    stages[-1]["_seen"] += 1
                    stages[-1][first] += e["dur"]
        counted = [i for i in range(1, len(runs)) if (i - 1) % (repeats + 1) != 0]
        run_ms = [runs_ms[i] for i in counted]
        runs, stages = [runs[i] for i in counted], [stages[i] for i in counted]
        ops = {op: statistics.median(r[op] for r in runs) / 1e3
               for op in set().union(*runs)}
        conv = {k: statistics.median(r[k] for r in stages) / 1e3
                for k in set().union(*stages) if k != "_seen"}
        total = statistics.median(sum(r.values()) for r in runs) / 1e3
        out.append({"ops_ms": ops, "conv_stage_ms": conv, "total_ms": total,
                    "run_ms": statistics.median(run_ms)})
    return out


def _rotated_latency(models: list[Any], example: torch.Tensor, args: argparse.Namespace,
                     ) -> list[float]:
    """Median ms per batch of each model: :func:`measure_latency_interleaved` once per
    rotation of the model order (a model timed right after FP32 runs on caches FP32 left
    cold), the median over rotations."""
    k = len(models)
    per: list[list[float]] = [[] for _ in models]
    for r in range(k):
        order = list(range(r, k)) + list(range(r))
        stats = measure_latency_interleaved(
            [models[i] for i in order], example, batch_sizes=(args.batch,), threads=1,
            warmup=3, repeats=max(1, args.repeats // k), rounds=max(1, args.rounds // k + 1))
        for i, s in zip(order, stats):
            per[i].append(s[args.batch].median_ms)
    return [statistics.median(v) for v in per]


def run_depth(depth: int, root: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    ref = load_pretrained_cifar_resnet(depth, find_pretrained(depth, root))
    calib_set = ds.cifar10_jpeg_train(root, limit=args.calib_images)
    calib = [(calib_set.tensors[0][i:i + 64], calib_set.tensors[1][i:i + 64])
             for i in range(0, args.calib_images, 64)]
    example = calib_set.tensors[0][:1]
    q = npr.compress(ref, Quantize(), calibration=calib, measure=False).model
    rows = [{"method": "ORT FP32", "path": export_onnx(ref, tmp / f"r{depth}_fp32.onnx",
                                                        example)},
            {"method": "netpress INT8 (auto), this export",
             "path": export_onnx(q, tmp / f"r{depth}_np.onnx", example)}]
    with _without_rewrites():
        rows.append({"method": "netpress INT8 (auto), export before int8_graph",
                     "path": export_onnx(q, tmp / f"r{depth}_np_before.onnx", example)})
    rows.append({"method": "ORT quantize_static U8S8", "path": ort_quantize_static(
        rows[0]["path"], tmp / f"r{depth}_ort.onnx", calib_set.tensors[0].numpy(), False)})
    xj = ds.cifar10_jpeg_test(root, limit=args.check_images).tensors[0].numpy()
    now, before = (ort_logits(r["path"], xj) for r in rows[1:3])
    identical = {"images": len(xj), "max_abs_logit_diff": float(np.abs(now - before).max()),
                 "same_top1": float((now.argmax(1) == before.argmax(1)).mean())}
    lat = _rotated_latency([OrtModule(r["path"]) for r in rows], example, args)
    x64 = np.ascontiguousarray(np.repeat(example.numpy(), args.batch, axis=0))
    prof = profile([r["path"] for r in rows], x64, args.rounds, max(1, args.repeats //
                                                                   args.rounds), tmp)
    for row, ms, p in zip(rows, lat, prof):
        ops = optimized_op_types(row["path"])
        row.update(throughput=args.batch * 1e3 / ms, **p,
                   optimized_ops={o: ops.count(o) for o in sorted(set(ops))})
        row["path"] = row["path"].name
    return {"model": f"resnet{depth}", "rows": rows, "rewrite_identical": identical}


def _ratio(a: dict[str, float], b: dict[str, float], key: str) -> float:
    return a.get(key, 0.0) / max(b.get(key, 0.0), 1e-9)


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [f"CPU flags: {meta['cpu_flags']} (target auto = {meta['host_target']}); ONNX "
           f"Runtime {meta['ort_version']}, 1 thread, default graph optimizations, batch "
           f"{meta['batch']}; throughput = median over rotations of the model "
           f"order of the median of interleaved rounds ({meta['repeats']} runs per model in "
           f"all); profile = median per run over {meta['rounds']} interleaved rounds in "
           f"rotating order, the first run of each visit not counted. Command: "
           f"`{meta['command']}`\n"]
    for res in results:
        rows = res["rows"]
        fp32 = rows[0]
        ident = res["rewrite_identical"]
        out.append(f"### {res['model']}\n\nRewritten vs unrewritten export on "
                   f"{ident['images']} JPEG test images: max |logit diff| "
                   f"{ident['max_abs_logit_diff']:.3g}, same top-1 "
                   f"{100 * ident['same_top1']:.2f}%.\n")
        out.append(markdown_table(
            ["method", f"img/s b{meta['batch']}", "× FP32", "profiled run ms (× FP32)",
             "ops ORT runs"],
            [[r["method"], f"{r['throughput']:.0f}",
              f"{r['throughput'] / fp32['throughput']:.2f}",
              f"{r['run_ms']:.2f} ({fp32['run_ms'] / r['run_ms']:.2f}×)",
              ", ".join(f"{k} {v}" for k, v in r["optimized_ops"].items())] for r in rows])
            + "\n")
        ops = sorted({o for r in rows for o in r["ops_ms"]},
                     key=lambda o: -max(r["ops_ms"].get(o, 0.0) for r in rows))
        out.append(markdown_table(["op type (ms per run)", *[r["method"] for r in rows]],
                                  [[o, *[f"{r['ops_ms'].get(o, 0.0):.2f}" for r in rows]]
                                   for o in ops]) + "\n")
        stages = sorted({k for r in rows for k in r["conv_stage_ms"]})
        out.append(markdown_table(
            ["convolutions (ms per run)", *[r["method"] for r in rows],
             "FP32 / this export"],
            [[k, *[f"{r['conv_stage_ms'].get(k, 0.0):.2f}" for r in rows],
              f"{_ratio(fp32['conv_stage_ms'], rows[1]['conv_stage_ms'], k):.2f}×"]
             for k in stages]) + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = depth_parser(__doc__)
    p.add_argument("--check-images", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path,
                   default=Path(__file__).parent / "results/int8_profile.json")
    args = p.parse_args(argv)
    import onnxruntime

    torch.set_num_threads(1)
    root = data_dir(args.data)
    meta = {"batch": args.batch, "rounds": args.rounds, "repeats": args.repeats,
            "ort_version": onnxruntime.__version__, "host_target": host_target(),
            "cpu_flags": " ".join(sorted(cpu_flags())),
            "command": " ".join(["python", "benchmarks/int8_profile.py",
                                 *(argv or sys.argv[1:])])}
    return run_depths(run_depth, render, root, args, meta)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
