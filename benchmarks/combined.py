"""The combined path on the pretrained CIFAR-10 ResNet-56: prune, INT8, distil, ONNX Runtime.

Recipe (``--order distill-ptq``, the default): ``StructuredPrune(macs=0.5)``, then ``Distill``
of the pruned float model from the unpruned one, then post-training INT8 ``Quantize``.
``--order qat`` adds a short ``QAT`` (LSQ scales, distillation, Adam 1e-4) after the
distillation instead of the post-training step. QAT straight after pruning (the issue's
literal order) trains the BatchNorm-folded network, which has no normalisation left: at a
distillation learning rate (SGD 0.01) it diverged to 11% accuracy, so distillation runs on
the float model first. Both variants of the pruning are run:
``protect=("conv1",)`` (the stem keeps its channels, so the option-A residual stream stays
whole) and the default (the residual stream is pruned too).

The compressed model is exported as QDQ ONNX and run in ONNX Runtime. In the same run, with
interleaved rounds (each round times every model in turn; medians), its throughput at batch
1 and 64 with one thread is compared with the unpruned model in PyTorch eager FP32 (the
issue's baseline), ONNX Runtime FP32, and ONNX Runtime INT8 (post-training ``Quantize``).
Accuracy is on the lossless CIFAR-10 test subset (1,017 images) and agreement with the FP32
model on the 10k JPEG test set, both from the ONNX Runtime model.

    python benchmarks/combined.py --data ../shared/data [--train-images 20000] [--epochs 2]
        [--order qat|distill-ptq] [--protect both|stem|none] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, accuracy, agreement, data_dir, logits, markdown_table, write_json

import netpress as npr
from netpress import datasets as ds
from netpress.export.onnx import OrtModule, export_onnx
from netpress.measure.latency import measure_latency_interleaved
from netpress.measure.macs import count_macs
from netpress.models.cifar_resnet import find_pretrained, load_pretrained_cifar_resnet
from netpress.prune.structured import StructuredPrune
from netpress.quant import QAT, Quantize

#: ``default``: ``StructuredPrune(macs=...)`` as it is (today: residual streams kept whole)
PROTECT: dict[str, tuple[str, ...] | None] = {"stem": ("conv1",), "none": (), "default": None}


def ort_logits(module: OrtModule, dataset: Any, batch: int = 500) -> torch.Tensor:
    x = dataset.tensors[0]
    return torch.cat([module(x[i:i + batch]) for i in range(0, len(x), batch)])


def _prune(args: argparse.Namespace, protect: tuple[str, ...] | None) -> StructuredPrune:
    if protect is None:
        return StructuredPrune(macs=args.macs)
    return StructuredPrune(macs=args.macs, protect=protect)


def recipe(args: argparse.Namespace, protect: tuple[str, ...] | None) -> list[Any]:
    prune = _prune(args, protect)
    train: dict[str, Any] = {"epochs": args.epochs, "lr": args.lr, "optimizer": "sgd",
                             "momentum": 0.9, "temperature": 4.0, "alpha": 0.9}
    if args.distill == "recovery":  # benchmarks/recovery.py's best recipe, feat_adam
        from recovery import BLOCKS

        train = {"epochs": args.epochs, "lr": 1e-3, "optimizer": "adam", "temperature": 4.0,
                 "alpha": 1.0, "features": BLOCKS}
    if args.order == "qat":
        # QAT trains the BN-folded network, which has no normalisation: it needs a far lower
        # rate than distillation of the float model (SGD 0.01 diverges, measured), so the
        # float model is distilled first and QAT then fine-tunes the INT8 model gently
        return [prune, npr.Distill(**train),
                QAT(max_steps=args.qat_steps, lr=1e-4, temperature=4.0, alpha=0.9)]
    return [prune, npr.Distill(**train), Quantize()]


def compress(ref: nn.Module, args: argparse.Namespace, protect: tuple[str, ...] | None,
             train: Any, calib: Any) -> tuple[nn.Module, float]:
    with Timer() as t:
        res = npr.compress(ref, recipe(args, protect), train=train, calibration=calib,
                           example_inputs=torch.randn(1, 3, 32, 32), measure=False,
                           seed=args.seed)
    return res.model, t.seconds


def throughput(models: dict[str, nn.Module], args: argparse.Namespace,
               ) -> dict[str, dict[int, float]]:
    stats = measure_latency_interleaved(list(models.values()), torch.randn(1, 3, 32, 32),
                                        batch_sizes=(1, 64), threads=args.threads,
                                        warmup=args.warmup, repeats=args.repeats,
                                        rounds=args.rounds)
    return {name: {b: b / (s.median_ms / 1e3) for b, s in st.items()}
            for name, st in zip(models, stats)}


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    root = data_dir(args.data)
    ref = load_pretrained_cifar_resnet(56, find_pretrained(56, root)).eval()
    exact = ds.cifar10_exact_test(root)
    jpeg = ds.cifar10_jpeg_test(root, limit=args.jpeg_limit)
    train_set = ds.cifar10_jpeg_train(root, limit=args.train_images)
    train: Any = ds.loader(train_set, batch_size=128, shuffle=True, seed=args.seed)
    if args.distill == "recovery":  # with random crop + flip, as benchmarks/recovery.py
        from recovery import Batches

        x_train, y_train = train_set.tensors
        train = Batches(x_train, y_train, 128, augment=True, seed=args.seed)
    calib = [(train_set.tensors[0][i:i + 64], train_set.tensors[1][i:i + 64])
             for i in range(0, args.calib_images, 64)]
    x1, y = exact.tensors[0][:1], exact.tensors[1]
    ref_jpeg = logits(ref, jpeg)
    base_macs = count_macs(ref, x1)
    rows: dict[str, dict[str, Any]] = {}
    timed: dict[str, nn.Module] = {"PyTorch eager FP32 (unpruned)": ref}

    def add_onnx(name: str, model: nn.Module, **extra: Any) -> None:
        path = export_onnx(model, tmp / f"{len(timed)}.onnx", x1)
        ort = OrtModule(path, threads=args.threads)
        timed[name] = ort
        rows[name] = {"accuracy": accuracy(ort_logits(ort, exact), y),
                      "agreement_jpeg": agreement(ort_logits(ort, jpeg), ref_jpeg),
                      "onnx_bytes": path.stat().st_size, **extra}
        print(name, {k: v for k, v in rows[name].items()}, file=sys.stderr, flush=True)

    rows["PyTorch eager FP32 (unpruned)"] = {"accuracy": accuracy(logits(ref, exact), y),
                                             "agreement_jpeg": 1.0, "macs": 1.0}
    add_onnx("ORT FP32 (unpruned)", ref, macs=1.0)
    ptq = npr.compress(ref, Quantize(), calibration=calib, measure=False).model
    add_onnx("ORT INT8 PTQ (unpruned)", ptq, macs=1.0)
    for tag in args.protect:
        model, seconds = compress(ref, args, PROTECT[tag], train, calib)
        # the same channels (L2 importance needs no data), without the refit: for the MACs
        pruned = npr.compress(ref, _prune(args, PROTECT[tag]), example_inputs=x1,
                              measure=False).model
        pruned_macs = count_macs(pruned, x1) / base_macs
        add_onnx(f"ORT INT8 pruned+{args.order} (protect={tag})", model,
                 macs=round(pruned_macs, 3), compress_seconds=round(seconds, 1),
                 fake_quant_agreement_jpeg=agreement(logits(model, jpeg), ref_jpeg))
    speeds = throughput(timed, args)
    base = speeds["PyTorch eager FP32 (unpruned)"]
    for name, speed in speeds.items():
        rows[name].update({f"throughput_b{b}": v for b, v in speed.items()})
        rows[name].update({f"speedup_b{b}": v / base[b] for b, v in speed.items()})
    return rows


def render(rows: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    how = (f"SGD lr {meta['lr']}, T=4, alpha=0.9" if meta.get("distill", "old") == "old"
           else "Adam lr 1e-3, T=4, alpha=1, block features, crop + flip")
    head = (f"ResNet-56, {meta['order']} order; distillation budget: {meta['epochs']} epoch(s) "
            f"over {meta['train_images']} JPEG train images (batch 128, {how}); calibration "
            f"{meta['calib_images']} images; {meta['threads']} "
            f"thread(s), throughput = median over {meta['rounds']} interleaved rounds; JPEG "
            f"test images: {meta['jpeg_images']}.\n")
    table = [[name, f"{100 * r['accuracy']:.2f}", f"{100 * r['agreement_jpeg']:.2f}",
              f"{r.get('macs', 1.0):.3f}", f"{r['throughput_b1']:.0f}",
              f"{r['speedup_b1']:.2f}x", f"{r['throughput_b64']:.0f}",
              f"{r['speedup_b64']:.2f}x"] for name, r in rows.items()]
    return head + "\n" + markdown_table(
        ["model", "accuracy % (lossless)", "agreement % (JPEG)", "MACs", "img/s b1",
         "vs eager b1", "img/s b64", "vs eager b64"], table) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="shared data folder (default: $NETPRESS_DATA)")
    p.add_argument("--macs", type=float, default=0.5)
    p.add_argument("--order", choices=("qat", "distill-ptq"), default="distill-ptq")
    p.add_argument("--qat-steps", type=int, default=50, help="QAT steps after distillation")
    p.add_argument("--protect", choices=("both", "stem", "none", "default"), default="both")
    p.add_argument("--distill", choices=("old", "recovery"), default="old",
                   help="old: SGD 0.01, T=4, alpha 0.9, no augmentation (issue 4's table); "
                        "recovery: Adam 1e-3, T=4, alpha 1, block features, crop + flip")
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--jpeg-limit", type=int, default=None, help="JPEG test images (10k)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/combined.json")
    args = p.parse_args(argv)
    if args.quick:
        args.train_images, args.epochs, args.calib_images = 256, 1.0, 128
        args.jpeg_limit, args.rounds, args.repeats, args.protect = 500, 2, 4, "stem"
    args.protect = ["stem", "none"] if args.protect == "both" else [args.protect]
    torch.set_num_threads(args.train_threads)
    meta = {k: getattr(args, k) for k in ("order", "distill", "epochs", "train_images", "lr",
                                          "calib_images", "threads", "rounds", "macs")}
    meta["jpeg_images"] = args.jpeg_limit or 10000
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args, Path(tmp))
    write_json(args.out, {**meta, "rows": rows})
    text = render(rows, meta)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
