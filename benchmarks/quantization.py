"""INT8 post-training quantization of the pretrained CIFAR-10 ResNets, netpress vs ONNX Runtime.

For each depth (default ResNet-20 and ResNet-56), with the same calibration images:

* ONNX Runtime FP32 (the float model exported by netpress);
* netpress ``Quantize()`` (BN folded, per-channel symmetric int8 weights, per-tensor uint8
  activations, bias correction) exported as QDQ ONNX, run in ONNX Runtime;
* ONNX Runtime's own ``quantize_static`` (QDQ, U8 activations / S8 weights, per channel,
  MinMax) on the FP32 ONNX model;
* netpress 4-bit ``Codebook`` weights (PyTorch; artefact size).

Reports accuracy on the lossless CIFAR-10 test subset (1,017 images), agreement with the
PyTorch FP32 model on the 10k JPEG test set, ONNX Runtime throughput at batch 1 and 64 with
the thread count fixed, and file sizes. Also the agreement between netpress's fake-quant
PyTorch model and its ONNX Runtime run.

    python benchmarks/quantization.py --data ../shared/data [--depths 20 56] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, accuracy, agreement, data_dir, logits, markdown_table, write_json

import netpress as npr
from netpress import datasets as ds
from netpress.export import dumps_artefact
from netpress.export.onnx import export_onnx, optimized_op_types, ort_latency, ort_session
from netpress.models.cifar_resnet import find_pretrained, load_pretrained_cifar_resnet
from netpress.quant import Codebook, Quantize


def ort_logits(path: Path, dataset: Any, threads: int, batch: int = 500) -> torch.Tensor:
    session = ort_session(path, threads=threads)
    name = session.get_inputs()[0].name
    x = dataset.tensors[0].numpy()
    outs = [session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return torch.from_numpy(np.concatenate(outs))


class _Reader:
    """ONNX Runtime's CalibrationDataReader over the calibration images."""

    def __init__(self, x: np.ndarray, name: str, batch: int = 64) -> None:
        self.batches = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def ort_quantize_static(fp32: Path, out: Path, calib: np.ndarray) -> Path:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    name = ort_session(pre).get_inputs()[0].name
    quantize_static(str(pre), str(out), _Reader(calib, name), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, calibrate_method=CalibrationMethod.MinMax)
    return out


def interleaved_throughput(paths: list[Path], example: torch.Tensor,
                           args: argparse.Namespace) -> list[dict[int, float]]:
    """Images/s per model and batch size; models measured in turn, median over rounds.

    Interleaving spreads any background load over all models alike.
    """
    samples: list[dict[int, list[float]]] = [{1: [], 64: []} for _ in paths]
    for _ in range(args.rounds):
        for i, path in enumerate(paths):
            lat = ort_latency(path, example, threads=args.threads, batch_sizes=(1, 64),
                              warmup=args.warmup, repeats=args.repeats)
            for b in (1, 64):
                samples[i][b].append(lat[b]["throughput"])
    return [{b: statistics.median(v) for b, v in s.items()} for s in samples]


def onnx_row(name: str, path: Path, exact: Any, jpeg: Any, ref_jpeg: torch.Tensor,
             args: argparse.Namespace) -> dict[str, Any]:
    out_exact, out_jpeg = ort_logits(path, exact, args.threads), ort_logits(path, jpeg,
                                                                             args.threads)
    ops = optimized_op_types(path)
    return {"method": name, "accuracy": accuracy(out_exact, exact.tensors[1]),
            "agreement_jpeg": agreement(out_jpeg, ref_jpeg),
            "file_bytes": path.stat().st_size, "_jpeg_logits": out_jpeg,
            "optimized_ops": {op: ops.count(op) for op in sorted(set(ops))}}


def run_depth(depth: int, root: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    ref = load_pretrained_cifar_resnet(depth, find_pretrained(depth, root))
    exact = ds.cifar10_exact_test(root)
    jpeg = ds.cifar10_jpeg_test(root, limit=args.jpeg_limit)
    calib_set = ds.cifar10_jpeg_train(root, limit=args.calib_images)
    calib = [(calib_set.tensors[0][i:i + 64], calib_set.tensors[1][i:i + 64])
             for i in range(0, args.calib_images, 64)]
    ref_jpeg = logits(ref, jpeg)
    example = exact.tensors[0][:1]
    fp32 = export_onnx(ref, tmp / f"r{depth}_fp32.onnx", example)
    with Timer() as t:
        q = npr.compress(ref, Quantize(), calibration=calib, measure=False).model
    ours = export_onnx(q, tmp / f"r{depth}_netpress_int8.onnx", example)
    theirs = ort_quantize_static(fp32, tmp / f"r{depth}_ort_int8.onnx",
                                 calib_set.tensors[0].numpy())
    rows = [onnx_row("ORT FP32", fp32, exact, jpeg, ref_jpeg, args),
            onnx_row("netpress Quantize (QDQ, ORT)", ours, exact, jpeg, ref_jpeg, args),
            onnx_row("ORT quantize_static U8S8", theirs, exact, jpeg, ref_jpeg, args)]
    speeds = interleaved_throughput([fp32, ours, theirs], example, args)
    for row, speed in zip(rows, speeds):
        row.update(throughput_b1=speed[1], throughput_b64=speed[64])
    fake_jpeg = logits(q, jpeg)
    ort_ours = rows[1].pop("_jpeg_logits")
    for r in rows:
        r.pop("_jpeg_logits", None)
    cb = npr.compress(ref, Codebook(bits=4), measure=False).model
    rows.append({"method": "netpress Codebook 4-bit (PyTorch)",
                 "accuracy": accuracy(logits(cb, exact), exact.tensors[1]),
                 "agreement_jpeg": agreement(logits(cb, jpeg), ref_jpeg),
                 "file_bytes": len(dumps_artefact(cb))})
    return {"model": f"resnet{depth}", "reference_accuracy": accuracy(logits(ref, exact),
                                                                      exact.tensors[1]),
            "float_artefact_bytes": len(dumps_artefact(ref)),
            "int8_artefact_bytes": len(dumps_artefact(q)),
            "fake_quant_vs_ort_agreement": agreement(fake_jpeg, ort_ours),
            "quantize_seconds": round(t.seconds, 1), "rows": rows}


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [f"Calibration: {meta['calib_images']} JPEG train images; ONNX Runtime "
           f"{meta['ort_version']}, {meta['threads']} thread(s), throughput = median of "
           f"{meta['rounds']} interleaved rounds; JPEG test images: {meta['jpeg_images']}.\n"]
    for res in results:
        out.append(f"### {res['model']} (FP32 accuracy {100 * res['reference_accuracy']:.2f}%; "
                   f"fake-quant vs ORT agreement {100 * res['fake_quant_vs_ort_agreement']:.2f}"
                   f"%; artefact {res['float_artefact_bytes']:,} B float, "
                   f"{res['int8_artefact_bytes']:,} B int8)\n")
        rows = [[r["method"], f"{100 * r['accuracy']:.2f}", f"{100 * r['agreement_jpeg']:.2f}",
                 f"{r['throughput_b1']:.0f}" if "throughput_b1" in r else "-",
                 f"{r['throughput_b64']:.0f}" if "throughput_b64" in r else "-",
                 f"{r['file_bytes']:,}"] for r in res["rows"]]
        out.append(markdown_table(["method", "accuracy % (lossless)", "agreement % (JPEG)",
                                   "img/s b1", "img/s b64", "file bytes"], rows) + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="shared data folder (default: $NETPRESS_DATA)")
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--jpeg-limit", type=int, default=None, help="JPEG test images (10k)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--out", type=Path,
                   default=Path(__file__).parent / "results/quantization.json")
    args = p.parse_args(argv)
    if args.quick:
        args.depths, args.calib_images, args.jpeg_limit, args.rounds = [20], 128, 1000, 2
    import onnxruntime

    torch.set_num_threads(args.threads)
    root = data_dir(args.data)
    meta = {"calib_images": args.calib_images, "threads": args.threads, "rounds": args.rounds,
            "ort_version": onnxruntime.__version__, "jpeg_images": args.jpeg_limit or 10000}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            results.append(run_depth(depth, root, args, Path(tmp)))
            write_json(args.out, {**meta, "results": results})
            print(render(results[-1:], meta), flush=True)
    args.out.with_suffix(".md").write_text(render(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
