"""INT8 post-training quantization of the pretrained CIFAR-10 ResNets on two kinds of CPU.

For each depth (default ResNet-20 and ResNet-56), with the same 512 calibration images:

* ONNX Runtime FP32 (the float model exported by netpress);
* netpress ``Quantize()`` with ``target="auto"`` (the CPU this runs on), exported as QDQ ONNX;
* netpress ``Quantize(target="x86-avx2")``: what ``auto`` gives on an AVX2 CPU without VNNI;
* netpress as it was before this work (``target="x86-vnni", input_grid=False,
  equalize=False, range_search=False``);
* netpress ``auto`` with min-max activation ranges (``range_search=False``, the default
  before it was measured better on both models), and ``auto`` with the classifier kept in
  float (mixed precision at the cheapest place: the pooled input of the last Linear carries
  a tenth of ResNet-20's activation noise);
* ONNX Runtime's own ``quantize_static`` (QDQ, U8 activations, S8 per-channel weights,
  MinMax), plain and with ``reduce_range=True`` (7-bit weights);
* with ``--variants ... qat``: ``Quantize()``'s ranges, then a short quantization-aware
  distillation (:class:`netpress.quant.qat.QAT`, pure KL to the FP32 logits, the PTQ scales
  kept: ``learn_scales=False`` had the lower held-out KL) on
  the 50k JPEG train images with random crop + flip (``--qat-steps`` batches of 128).

For each netpress row, "fake-quant vs ORT" is the top-1 agreement of the PyTorch fake-quant
model with its exported ONNX model run by ONNX Runtime on the 10k JPEG test images.

Reports accuracy on the lossless CIFAR-10 test subset (1,017 images), agreement with the
PyTorch FP32 model on the 10k JPEG test set, ONNX Runtime throughput at batch 1 and 64 (all
models timed in interleaved rounds, one thread) and file sizes; then, for an AVX2 CPU without
VNNI, the agreement of every INT8 model run by ONNX Runtime under ``qemu-x86_64 -cpu Haswell``
(CPUID then reports AVX2 only, so ONNX Runtime picks its AVX2 kernels) on the first
``--qemu-images`` JPEG test images, and the agreement netpress's kernel emulator
(:func:`netpress.quant.emulate.emulated_kernels`) predicts for the netpress models there.

    python benchmarks/quantization.py --data ../shared/data [--depths 20 56] [--quick]
        [--qemu-images 1000] [--no-qemu]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, accuracy, agreement, data_dir, logits, markdown_table, write_json

import netpress as npr
from netpress import datasets as ds
from netpress.export.onnx import OrtModule, export_onnx, optimized_op_types, ort_session
from netpress.measure import measure_latency_interleaved
from netpress.models.cifar_resnet import find_pretrained, load_pretrained_cifar_resnet
from netpress.quant import Quantize
from netpress.quant.emulate import emulated_kernels
from netpress.quant.qat import QAT
from netpress.quant.target import TargetMismatchWarning, cpu_flags, host_target

QEMU_CPU = "Haswell"
HEAD = "linear"  # the classifier of the CIFAR ResNets
#: the QAT recipe chosen on held-out train JPEGs (BENCHMARKS.md, issue 10 third follow-up)
QAT_STEPS, QAT_LR, QAT_T = 200, 1e-5, 1.0
VARIANTS: dict[str, tuple[str, Quantize | QAT]] = {
    "auto": ("netpress INT8, target auto (= {auto})", Quantize()),
    "x86-avx2": ("netpress INT8, target x86-avx2", Quantize(target="x86-avx2")),
    "before": ("netpress INT8 before this issue (x86-vnni, no input grid, no equalization)",
               Quantize(target="x86-vnni", input_grid=False, equalize=False,
                        range_search=False)),
    "minmax": ("netpress INT8 auto, min-max ranges (range_search=False)",
               Quantize(range_search=False)),
    "head": (f"netpress INT8 auto, classifier {HEAD!r} float", Quantize(ignore=(HEAD,))),
    "qat": ("netpress INT8 auto + QAT distill {steps} steps (Adam {lr:g}, T={t:g}, PTQ scales "
            "fixed, crop+flip)",
            QAT(max_steps=QAT_STEPS, lr=QAT_LR, temperature=QAT_T, alpha=1.0,
                learn_scales=False)),
}


def ort_logits(path: Path, x: np.ndarray, threads: int = 1, batch: int = 500) -> np.ndarray:
    session = ort_session(path, threads=threads)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


class _Reader:
    """ONNX Runtime's CalibrationDataReader over the calibration images."""

    def __init__(self, x: np.ndarray, name: str, batch: int = 64) -> None:
        self.batches = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def ort_quantize_static(fp32: Path, out: Path, calib: np.ndarray, reduce_range: bool) -> Path:
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
                    per_channel=True, reduce_range=reduce_range,
                    calibrate_method=CalibrationMethod.MinMax)
    return out


# -- the qemu worker: ONNX Runtime logits on an emulated AVX2-only CPU ----------------------------
def worker(args: argparse.Namespace) -> int:
    """Run each ONNX model on the saved images; write logits, warnings and the CPU seen."""
    x = np.load(args.images)
    out: dict[str, Any] = {"host_target": np.array(host_target())}
    for i, path in enumerate(args.worker):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", TargetMismatchWarning)
            out[f"logits_{i}"] = ort_logits(Path(path), x)
        out[f"warned_{i}"] = np.array(any(issubclass(w.category, TargetMismatchWarning)
                                          for w in seen))
    np.savez(args.worker_out, **out)
    return 0


def run_qemu(paths: list[Path], x: np.ndarray, tmp: Path) -> dict[str, Any] | None:
    qemu = shutil.which("qemu-x86_64") or shutil.which("qemu-x86_64-static")
    if qemu is None or platform.machine().lower() not in ("x86_64", "amd64"):
        print("!!! qemu-x86_64 not found: no emulated AVX2 column", flush=True)
        return None
    np.save(tmp / "qemu_x.npy", x)
    cmd = [qemu, "-cpu", QEMU_CPU, sys.executable, __file__, "--images",
           str(tmp / "qemu_x.npy"), "--worker-out", str(tmp / "qemu_out.npz"), "--worker",
           *map(str, paths)]
    with Timer() as t:
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"!!! qemu run failed: {done.stderr[-2000:]}", flush=True)
        return None
    res = dict(np.load(tmp / "qemu_out.npz"))
    res["seconds"] = t.seconds
    return res


# -- one depth ---------------------------------------------------------------------------------
def _train_batches(root: Path, seed: int = 0) -> Any:
    """The 50k JPEG train images in shuffled batches of 128 with random crop + flip."""
    from recovery import Batches

    x, y = ds.cifar10_jpeg_train(root).tensors
    return Batches(x, y, 128, augment=True, seed=seed)


def _variant(key: str, args: argparse.Namespace) -> tuple[str, Quantize | QAT]:
    label, cfg = VARIANTS[key]
    if isinstance(cfg, QAT):
        cfg = dataclasses.replace(cfg, max_steps=args.qat_steps)
        label = label.format(steps=cfg.max_steps, lr=cfg.lr, t=cfg.temperature, auto="{auto}")
    return label, cfg


def _models(ref: torch.nn.Module, calib: list[Any], example: torch.Tensor, depth: int,
            tmp: Path, calib_x: np.ndarray, args: argparse.Namespace, root: Path,
            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    keys = list(args.variants)
    auto = host_target()
    if auto == "x86-avx2":
        keys = [k for k in keys if k != "x86-avx2"]
    rows: list[dict[str, Any]] = [{"method": "ORT FP32", "path": export_onnx(
        ref, tmp / f"r{depth}_fp32.onnx", example)}]
    torch_models = {}
    for key in keys:
        label, cfg = _variant(key, args)
        train = _train_batches(root) if isinstance(cfg, QAT) else None
        with Timer() as t:
            q = npr.compress(ref, cfg, calibration=calib, train=train, measure=False).model
        rows.append({"method": label.format(auto=auto), "netpress": key,
                     "quantize_seconds": round(t.seconds, 1),
                     "path": export_onnx(q, tmp / f"r{depth}_netpress_{key}.onnx", example)})
        torch_models[key] = q
    fp32 = rows[0]["path"]
    for rr in (False, True):
        name = "ORT quantize_static U8S8" + (" reduce_range" if rr else "")
        rows.append({"method": name, "path": ort_quantize_static(
            fp32, tmp / f"r{depth}_ort{'_rr' if rr else ''}.onnx", calib_x, rr)})
    return rows, torch_models


def run_depth(depth: int, root: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    ref = load_pretrained_cifar_resnet(depth, find_pretrained(depth, root))
    exact = ds.cifar10_exact_test(root)
    jpeg = ds.cifar10_jpeg_test(root, limit=args.jpeg_limit)
    calib_set = ds.cifar10_jpeg_train(root, limit=args.calib_images)
    calib = [(calib_set.tensors[0][i:i + 64], calib_set.tensors[1][i:i + 64])
             for i in range(0, args.calib_images, 64)]
    ref_jpeg, ref_exact = logits(ref, jpeg), logits(ref, exact)
    example = exact.tensors[0][:1]
    rows, torch_models = _models(ref, calib, example, depth, tmp, calib_set.tensors[0].numpy(),
                                 args, root)
    xj, xe = jpeg.tensors[0].numpy(), exact.tensors[0].numpy()
    for row in rows:
        out_jpeg = torch.from_numpy(ort_logits(row["path"], xj))
        row.update(accuracy=accuracy(torch.from_numpy(ort_logits(row["path"], xe)),
                                     exact.tensors[1]),
                   agreement_jpeg=agreement(out_jpeg, ref_jpeg),
                   file_bytes=row["path"].stat().st_size)
        ops = optimized_op_types(row["path"])
        row["optimized_ops"] = {op: ops.count(op) for op in sorted(set(ops))}
        row["_jpeg"] = out_jpeg
        if row.get("netpress") in torch_models:  # the exported model computes the fake-quant's
            row["fake_quant_vs_ort"] = agreement(logits(torch_models[row["netpress"]], jpeg),
                                                 out_jpeg)
    mods = [OrtModule(r["path"]) for r in rows]
    lat = measure_latency_interleaved(mods, example, batch_sizes=(1, 64), threads=1,
                                      warmup=args.warmup, repeats=args.repeats,
                                      rounds=args.rounds)
    for row, stats in zip(rows, lat):
        row.update(throughput_b1=1e3 / stats[1].median_ms,
                   throughput_b64=64e3 / stats[64].median_ms)
    n = args.qemu_images
    if n:
        _avx2_columns(rows, torch_models, jpeg.tensors[0][:n], ref_jpeg[:n], tmp,
                      qemu=not args.no_qemu)
    for row in rows:
        row.pop("_jpeg")
        row["path"] = row["path"].name
    return {"model": f"resnet{depth}", "reference_accuracy": accuracy(ref_exact,
                                                                      exact.tensors[1]),
            "rows": rows}


def _avx2_columns(rows: list[dict[str, Any]], torch_models: dict[str, Any], x: torch.Tensor,
                  ref: torch.Tensor, tmp: Path, qemu: bool) -> None:
    """Agreement on the emulated AVX2 CPU (qemu), and the emulator's prediction of it."""
    int8 = [r for r in rows if r["method"] != "ORT FP32" and r.get("netpress") != "head"]
    for row in int8:
        row["native_agreement_subset"] = agreement(row["_jpeg"][:len(x)], ref)
        key = row.get("netpress")
        if key is not None:
            with torch.no_grad(), emulated_kernels(torch_models[key], "x86-avx2"):
                emulated = logits(torch_models[key], torch.utils.data.TensorDataset(
                    x, torch.zeros(len(x), dtype=torch.long)))
            row["emulated_avx2_agreement"] = agreement(emulated, ref)
    res = run_qemu([r["path"] for r in int8], x.numpy(), tmp) if qemu else None
    if res is None:
        return
    for i, row in enumerate(int8):
        out = torch.from_numpy(res[f"logits_{i}"])
        row["qemu_avx2_agreement"] = agreement(out, ref)
        row["qemu_same_top1_as_native"] = agreement(out, row["_jpeg"][:len(x)])
        row["qemu_warned"] = bool(res[f"warned_{i}"])
    for row in int8:
        row["qemu_cpu_seen"] = str(res["host_target"])
        row["qemu_seconds"] = round(float(res["seconds"]), 1)


# -- output ------------------------------------------------------------------------------------
def _pct(row: dict[str, Any], key: str) -> str:
    return f"{100 * row[key]:.2f}" if key in row else "-"


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [f"CPU flags: {meta['cpu_flags']} (netpress target auto = {meta['host_target']}). "
           f"Calibration: {meta['calib_images']} JPEG train images; ONNX Runtime "
           f"{meta['ort_version']}, 1 thread; throughput = median over "
           f"{meta['repeats']} runs in {meta['rounds']} interleaved rounds (shared machine: "
           f"timings are noisy, ratios between rows are what is comparable); JPEG test images: "
           f"{meta['jpeg_images']}; AVX2 columns: first {meta['qemu_images']} JPEG test images "
           f"under qemu-x86_64 -cpu {QEMU_CPU} (0: not run), emulator on the first "
           f"{meta.get('emulated_images', meta['qemu_images'])}.\n"]
    for res in results:
        fp32 = res["rows"][0]
        out.append(f"### {res['model']} (FP32 accuracy {100 * res['reference_accuracy']:.2f}%)"
                   "\n")
        rows = [[r["method"], _pct(r, "accuracy"), _pct(r, "agreement_jpeg"),
                 f"{r['throughput_b1']:.0f} ({r['throughput_b1'] / fp32['throughput_b1']:.2f}×)",
                 f"{r['throughput_b64']:.0f} "
                 f"({r['throughput_b64'] / fp32['throughput_b64']:.2f}×)",
                 f"{r['file_bytes']:,}", _pct(r, "fake_quant_vs_ort"),
                 _pct(r, "native_agreement_subset"),
                 _pct(r, "qemu_avx2_agreement"), _pct(r, "emulated_avx2_agreement"),
                 ("yes" if r.get("qemu_warned") else "no") if "qemu_warned" in r else "-"]
                for r in res["rows"]]
        out.append(markdown_table(
            ["method", "accuracy % (lossless)", "agreement % (JPEG test)", "img/s b1",
             "img/s b64", "file bytes", "fake-quant vs ORT %", "agreement % here (subset)",
             "agreement % AVX2 (qemu)", "AVX2 predicted by emulator", "warned on AVX2"],
            rows) + "\n")
    return "\n".join(out)


def depth_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every pretrained-ResNet INT8 benchmark takes."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--data", help="shared data folder (default: $NETPRESS_DATA)")
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    p.add_argument("--calib-images", type=int, default=512)
    return p


def main(argv: list[str] | None = None) -> int:
    p = depth_parser(__doc__)
    p.add_argument("--jpeg-limit", type=int, default=None, help="JPEG test images (10k)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    p.add_argument("--qemu-images", type=int, default=1000)
    p.add_argument("--no-qemu", action="store_true",
                   help="no qemu column (the emulator's prediction is still computed)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS),
                   help=f"netpress rows among {list(VARIANTS)}")
    p.add_argument("--qat-steps", type=int, default=QAT_STEPS,
                   help="training steps (batches of 128) of the 'qat' variant")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--out", type=Path,
                   default=Path(__file__).parent / "results/quantization.json")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--images", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.depths, args.calib_images, args.jpeg_limit = [20], 128, 500
        args.rounds, args.repeats, args.qemu_images = 2, 4, 50
        args.variants = ["auto", "head"]
    import onnxruntime

    torch.set_num_threads(1)
    root = data_dir(args.data)
    meta = {"calib_images": args.calib_images, "rounds": args.rounds, "repeats": args.repeats,
            "ort_version": onnxruntime.__version__, "jpeg_images": args.jpeg_limit or 10000,
            "qemu_images": 0 if args.no_qemu else args.qemu_images,
            "emulated_images": args.qemu_images,
            "host_target": host_target(), "cpu_flags": " ".join(sorted(cpu_flags())),
            "command": " ".join(["python", "benchmarks/quantization.py", *(argv or sys.argv[1:])])}
    return run_depths(run_depth, render, root, args, meta)


def run_depths(run: Callable[[int, Path, argparse.Namespace, Path], dict[str, Any]],
               show: Callable[[list[dict[str, Any]], dict[str, Any]], str], root: Path,
               args: argparse.Namespace, meta: dict[str, Any]) -> int:
    """``run`` each of ``args.depths`` in a scratch folder, writing ``args.out`` (JSON) after
    each and its markdown (``show``) at the end."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            results.append(run(depth, root, args, Path(tmp)))
            write_json(args.out, {**meta, "results": results})
            print(show(results[-1:], meta), flush=True)
    args.out.with_suffix(".md").write_text(show(results, meta))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
