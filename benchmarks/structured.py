"""Structured pruning: netpress vs Torch-Pruning.

Two parts:

``speed`` (no data needed): wall time of analysis + pruning to 50% MACs on ResNet-56
(batch 1, 32x32) and on a BERT-base-sized ``transformers`` model (random weights, sequence
128), for netpress (``prune_structured``: trace, groups, importance, policy, surgery and the
replay check) and Torch-Pruning 1.6 (``DependencyGraph`` + ``MetaPruner.step`` at a fixed
ratio), median of ``--repeats`` runs after one warm-up, one thread.

``accuracy`` (needs ``--data ../shared/data``): the pretrained option-A ResNet-56 pruned to
50% and 25% MACs by both tools, each followed by the same distillation budget on the JPEG
train set; accuracy on the lossless subset, agreement on the 10k JPEG test set, params/MACs,
and throughput (PyTorch eager and ONNX Runtime, batch 1 and 64) with speed-up vs unpruned.
Torch-Pruning is configured to run at all on option-A shortcuts: the padded residual
stream (the stem conv and every block's second conv) is in ``ignored_layers``, so it prunes
only the inner channels of each block; without that, its pruned model fails at forward.

    python benchmarks/structured.py speed --out benchmarks/results/structured_speed.json
    python benchmarks/structured.py accuracy --data ../shared/data --out ... [--quick]
        [--models DIR]  (keeps the recovered models, so that
    python benchmarks/structured.py throughput --update OUT.json --models DIR --out OUT.json
        re-times them later on a quiet machine)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netpress.measure.macs import count_macs
from netpress.models import build_model
from netpress.prune.structured import StructuredPrune, prune_structured


def _median_time(fn: Any, repeats: int) -> float:
    fn()  # warm-up (imports, caches)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _bert_base() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()  # BERT-base: 12 layers, 768 hidden, 12 heads
    ids = torch.randint(0, 30522, (1, 128))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _resnet_residual_convs(model: nn.Module) -> list[nn.Module]:
    """The convs writing the padded residual stream of an option-A CIFAR ResNet."""
    out: list[nn.Module] = [model.conv1, model.linear]  # type: ignore[list-item]
    for name, m in model.named_modules():
        if name.endswith(".conv2"):
            out.append(m)
    return out


def tp_prune(model: nn.Module, x: Any, ratio: float, ignored: list[nn.Module],
             num_heads: dict[nn.Module, int] | None = None) -> nn.Module:
    """Torch-Pruning 1.6: L2 magnitude, uniform ratio, channels rounded to 8."""
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=ignored, round_to=8, num_heads=num_heads or {},
        prune_num_heads=bool(num_heads), prune_head_dims=False)
    pruner.step()
    return model


def tp_to_target(model: nn.Module, x: Any, fraction: float,
                 ignored_fn: Any) -> tuple[nn.Module, float]:
    """Torch-Pruning at the smallest ratio (grid of 0.05) whose MACs are at or under
    ``fraction``; its MACs are not monotone in the ratio, so the grid is scanned. When no
    ratio reaches the target, the lowest-MACs result is returned (and reported)."""
    base = count_macs(model, x)
    best: tuple[float, nn.Module] | None = None
    for i in range(4, 20):
        trial = copy.deepcopy(model)
        tp_prune(trial, x, i * 0.05, ignored_fn(trial))
        ratio = count_macs(trial, x) / base
        if ratio <= fraction:
            return trial, ratio
        if best is None or ratio < best[0]:
            best = (ratio, trial)
    assert best is not None
    return best[1], best[0]


def speed(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    rows: dict[str, Any] = {}
    resnet = build_model("cifar_resnet56").eval()
    x = torch.randn(1, 3, 32, 32)
    cfg = StructuredPrune(macs=0.5)
    rows["resnet56"] = {"netpress_s": _median_time(lambda: prune_structured(resnet, cfg, x),
                                                   args.repeats)}
    bert, bx = _bert_base()
    rows["bert_base"] = {"netpress_s": _median_time(lambda: prune_structured(bert, cfg, bx),
                                                    max(1, args.repeats // 2))}
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        print("torch-pruning is not installed: netpress timings only", file=sys.stderr)
        return rows

    def tp_resnet() -> None:
        m = copy.deepcopy(resnet)
        tp_prune(m, x, 0.5, _resnet_residual_convs(m))

    copy_s = _median_time(lambda: copy.deepcopy(resnet), args.repeats)
    rows["resnet56"]["torch_pruning_s"] = _median_time(tp_resnet, args.repeats) - copy_s

    def tp_bert() -> None:
        m = copy.deepcopy(bert)
        heads = {layer.attention.self.query: 12 for layer in m.encoder.layer}
        heads.update({layer.attention.self.key: 12 for layer in m.encoder.layer})
        heads.update({layer.attention.self.value: 12 for layer in m.encoder.layer})
        tp_prune(m, bx, 0.5, [m.pooler], heads)

    try:
        bcopy = _median_time(lambda: copy.deepcopy(bert), 1)
        rows["bert_base"]["torch_pruning_s"] = _median_time(tp_bert, 1) - bcopy
    except Exception as exc:  # report, do not hide, a peer failure
        rows["bert_base"]["torch_pruning_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return rows


def throughput_table(models: dict[str, nn.Module], threads: int, repeats: int,
                     rounds: int = 5) -> dict[str, dict[str, float]]:
    """Images/s of every model in PyTorch eager and ONNX Runtime at batch 1 and 64.

    All models (eager and ONNX Runtime alike) are timed in alternating rounds (each round
    runs every model in turn), so load on the machine shifts every row alike and the
    speed-up ratios stay fair. The first model is the baseline of the speed-ups.
    """
    import tempfile

    from netpress.export.onnx import OrtModule, export_onnx
    from netpress.measure.latency import measure_latency_interleaved

    names = list(models)
    x = torch.randn(1, 3, 32, 32)
    with tempfile.TemporaryDirectory() as tmp:
        runnable = {(n, "eager"): m for n, m in models.items()}
        for i, (n, m) in enumerate(models.items()):
            path = export_onnx(m, Path(tmp) / f"{i}.onnx", x)
            runnable[(n, "ort")] = OrtModule(path, threads=threads)
        stats = measure_latency_interleaved(list(runnable.values()), x, batch_sizes=(1, 64),
                                            threads=threads, warmup=3, repeats=repeats,
                                            rounds=rounds)
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for (n, runtime), st in zip(runnable, stats):
        for b, one in st.items():
            out[n][f"{runtime}_b{b}"] = b / (one.median_ms / 1e3)
    base = out[names[0]]
    for n in names:
        for key in ("eager_b1", "eager_b64", "ort_b1", "ort_b64"):
            out[n][f"{key}_speedup"] = out[n][key] / base[key]
    return out


def accuracy_run(args: argparse.Namespace) -> dict[str, Any]:
    import netpress as npr
    from netpress import datasets as ds
    from netpress.models import find_pretrained, load_pretrained_cifar_resnet

    sys.path.insert(0, str(Path(__file__).parent))
    from _common import accuracy, agreement, data_dir, logits

    torch.set_num_threads(args.train_threads)
    root = data_dir(args.data)
    ref = load_pretrained_cifar_resnet(56, find_pretrained(56, root))
    exact, jpeg = ds.cifar10_exact_test(root), ds.cifar10_jpeg_test(root, limit=args.jpeg_limit)
    train = ds.loader(ds.cifar10_jpeg_train(root, limit=args.train_images), batch_size=128,
                      shuffle=True)
    distill = npr.Distill(epochs=args.epochs, lr=0.01, optimizer="sgd", momentum=0.9,
                          temperature=4.0, alpha=0.9)
    x1 = torch.randn(1, 3, 32, 32)
    ref_jpeg, y = logits(ref, jpeg), exact.tensors[1]
    base_macs = count_macs(ref, x1)
    models: dict[str, nn.Module] = {"unpruned": ref}
    rows: dict[str, Any] = {}
    errors: dict[str, str] = {}

    def measure(name: str, model: nn.Module, seconds: float) -> None:
        model.eval()
        models[name] = model
        out = logits(model, jpeg)
        rows[name] = {"accuracy": accuracy(logits(model, exact), y),
                      "agreement_jpeg": agreement(out, ref_jpeg),
                      "params": sum(p.numel() for p in model.parameters()),
                      "macs": count_macs(model, x1), "seconds": round(seconds, 1)}
        print(name, json.dumps(rows[name]), file=sys.stderr, flush=True)
        if args.out:  # keep what is done if a later row fails
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"partial": True, "rows": rows}, indent=2) + "\n")

    if args.models:
        args.models.mkdir(parents=True, exist_ok=True)

    measure("unpruned", ref, 0.0)
    for fraction in args.macs:
        for tag, protect in (("netpress", ()), ("netpress-keep-residual", ("conv1",))):
            # protecting the stem conv keeps the whole residual stream coupled to it, the
            # like-for-like setting of the Torch-Pruning run
            t = time.perf_counter()
            try:
                res = npr.compress(ref, [StructuredPrune(macs=fraction, protect=protect),
                                         distill], train=train, example_inputs=x1,
                                   measure=False, seed=args.seed)
            except npr.RecipeError as exc:  # e.g. the floors cannot reach the target
                errors[f"{tag}@{fraction}"] = str(exc)
                print(f"{tag}@{fraction}: {exc}", file=sys.stderr, flush=True)
                continue
            measure(f"{tag}@{fraction}", res.model, time.perf_counter() - t)
            if args.models:
                res.save(args.models / f"{tag}@{fraction}.npress")
        t = time.perf_counter()
        tp_model, _ = tp_to_target(copy.deepcopy(ref), x1, fraction, _resnet_residual_convs)
        res = npr.compress(tp_model, [distill], train=train, reference=ref,
                           example_inputs=x1, measure=False, seed=args.seed)
        measure(f"torch_pruning@{fraction}", res.model, time.perf_counter() - t)
        if args.models:
            res.save(args.models / f"torch_pruning@{fraction}.npress")
    for row in rows.values():
        row["macs_fraction"] = row["macs"] / base_macs
    speeds = throughput_table(models, args.threads, args.repeats)
    for name, sp in speeds.items():
        rows[name].update(sp)
    return {"settings": {"distill": distill.to_dict(), "train_images": args.train_images,
                         "jpeg_test_images": len(jpeg), "threads": args.threads,
                         "train_threads": args.train_threads, "seed": args.seed,
                         "torch_pruning": "L2 magnitude, uniform, round_to=8, the smallest "
                                          "ratio on a 0.05 grid reaching the MACs target; "
                                          "ignored_layers = stem conv, every block's conv2 and "
                                          "the classifier (the padded residual stream)"},
            "rows": rows, "errors": errors}


def throughput_run(args: argparse.Namespace) -> dict[str, Any]:
    """Re-measure the throughput of the models an ``accuracy`` run saved, on a quiet machine."""
    import netpress as npr
    from netpress.models import build_model

    result = json.loads(args.update.read_text())
    models: dict[str, nn.Module] = {"unpruned": build_model("cifar_resnet56")}
    for name in result["rows"]:
        if name != "unpruned":
            models[name] = npr.load(args.models / f"{name}.npress")
    if args.data:  # the real weights, not that it changes the timing of dense kernels
        from netpress.models import find_pretrained, load_pretrained_cifar_resnet
        models["unpruned"] = load_pretrained_cifar_resnet(56, find_pretrained(56, args.data))
    for name, sp in throughput_table(models, args.threads, args.repeats).items():
        result["rows"][name].update(sp)
    result["settings"]["throughput_threads"] = args.threads
    return result


def latency_run(args: argparse.Namespace) -> dict[str, Any]:
    """``StructuredPrune(latency=...)`` on ResNet-56 for each runtime: the MACs fraction the
    search settles on, its measured latency ratio, every try, and the wall time."""
    import netpress as npr

    model = build_model("cifar_resnet56").eval()
    x = torch.randn(1, 3, 32, 32)
    out: dict[str, Any] = {}
    for runtime in ("eager", "onnxruntime"):
        t = time.perf_counter()
        res = npr.compress(model, [StructuredPrune(latency=args.target, latency_runtime=runtime,
                                                   latency_batch=args.batch)],
                           example_inputs=x, measure=False)
        step = res.report.to_dict()["steps"][0]
        out[runtime] = {"macs_fraction": step["macs_after"] / step["macs_before"],
                        "latency_ratio": step["latency_ratio"],
                        "tries": step["latency_tries"],
                        "seconds": round(time.perf_counter() - t, 1)}
    return {"target": args.target, "batch": args.batch, "runs": out}


def oneshot_run(args: argparse.Namespace) -> dict[str, Any]:
    """One-shot accuracy (no recovery) of ResNet-56 pruned to ``--macs``, for a few settings,
    with and without BatchNorm re-estimation on 1,024 JPEG train images."""
    import netpress as npr
    from netpress import datasets as ds
    from netpress.models import find_pretrained, load_pretrained_cifar_resnet

    sys.path.insert(0, str(Path(__file__).parent))
    from _common import accuracy, data_dir, logits

    torch.set_num_threads(args.threads)
    root = data_dir(args.data)
    ref = load_pretrained_cifar_resnet(56, find_pretrained(56, root))
    exact = ds.cifar10_exact_test(root)
    calib = ds.loader(ds.cifar10_jpeg_train(root, limit=1024), batch_size=128)
    x1 = torch.randn(1, 3, 32, 32)
    settings: dict[str, dict[str, Any]] = {
        "default": {}, "global": {"allocation": "global"}, "protect-stem": {"protect": ("conv1",)},
        "taylor-global": {"importance": "taylor", "allocation": "global"}}
    out: dict[str, Any] = {}
    for tag, kw in settings.items():
        for recal in (0, 8):
            cfg = StructuredPrune(macs=args.macs, recalibrate_bn=recal, **kw)
            res = npr.compress(ref, [cfg], calibration=calib, example_inputs=x1, measure=False)
            out[f"{tag}, recalibrate_bn={recal}"] = accuracy(logits(res.model, exact),
                                                            exact.tensors[1])
            print(tag, recal, out[f"{tag}, recalibrate_bn={recal}"], file=sys.stderr)
    return {"macs": args.macs, "accuracy_one_shot": out}


def hessian_run(args: argparse.Namespace) -> dict[str, Any]:
    """Hutchinson Hessian importance in FP32 and under FP16 autocast on ResNet-56: wall time
    of the pruning call (alternating runs, median), how many pruned channels the two choose
    alike, and the one-shot accuracy of each pruned model on the lossless test subset."""
    import netpress as npr
    from netpress import datasets as ds
    from netpress.models import find_pretrained, load_pretrained_cifar_resnet

    sys.path.insert(0, str(Path(__file__).parent))
    from _common import accuracy, data_dir, logits

    torch.set_num_threads(args.threads)
    root = data_dir(args.data)
    ref = load_pretrained_cifar_resnet(56, find_pretrained(56, root))
    exact = ds.cifar10_exact_test(root)
    calib = ds.loader(ds.cifar10_jpeg_train(root, limit=args.batches * 64), batch_size=64)
    x1 = torch.randn(1, 3, 32, 32)
    times: dict[str, list[float]] = {"fp32": [], "fp16": []}
    models: dict[str, nn.Module] = {}
    for _ in range(args.repeats):
        for tag in ("fp32", "fp16"):
            cfg = StructuredPrune(macs=0.5, importance="hessian", fp16=tag == "fp16",
                                  calibration_batches=args.batches,
                                  hessian_samples=args.samples)
            t = time.perf_counter()
            res = npr.compress(ref, [cfg], calibration=calib, example_inputs=x1,
                               measure=False)
            times[tag].append(time.perf_counter() - t)
            models[tag] = res.model
    same = sum(1 for a, b in zip(models["fp32"].state_dict().values(),
                                 models["fp16"].state_dict().values())
               if a.shape == b.shape and torch.equal(a, b))
    total = len(models["fp32"].state_dict())
    y = exact.tensors[1]
    out = {tag: {"seconds_median": statistics.median(ts), "seconds": [round(t, 3) for t in ts],
                 "accuracy_one_shot": accuracy(logits(models[tag], exact), y)}
           for tag, ts in times.items()}
    out["fp16_speedup"] = out["fp32"]["seconds_median"] / out["fp16"]["seconds_median"]
    out["identical_tensors_after_pruning"] = f"{same}/{total}"
    out["settings"] = {"calibration_batches": args.batches, "batch_size": 64,
                       "hessian_samples": args.samples, "threads": args.threads,
                       "device": "cpu"}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--out", type=Path)
    ap = sub.add_parser("accuracy")
    ap.add_argument("--data")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--macs", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--epochs", type=int, default=2, help="distillation epochs (both tools)")
    ap.add_argument("--train-images", type=int, default=None, help="JPEG train images (50k)")
    ap.add_argument("--jpeg-limit", type=int, default=None, help="JPEG test images (10k)")
    ap.add_argument("--threads", type=int, default=1, help="threads for throughput")
    ap.add_argument("--train-threads", type=int, default=2, help="threads for distillation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", type=Path, help="save the recovered models here (.npress)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    tp = sub.add_parser("throughput", help="re-time the models an accuracy run saved")
    tp.add_argument("--update", type=Path, required=True, help="the accuracy run's JSON")
    tp.add_argument("--models", type=Path, required=True)
    tp.add_argument("--data")
    tp.add_argument("--threads", type=int, default=1)
    tp.add_argument("--repeats", type=int, default=40)
    tp.add_argument("--out", type=Path)
    hp = sub.add_parser("hessian", help="FP16 vs FP32 Hutchinson importance")
    hp.add_argument("--data")
    hp.add_argument("--batches", type=int, default=4)
    hp.add_argument("--samples", type=int, default=4)
    hp.add_argument("--threads", type=int, default=1)
    hp.add_argument("--repeats", type=int, default=3)
    hp.add_argument("--out", type=Path)
    op = sub.add_parser("oneshot", help="one-shot accuracy, with and without BN re-estimation")
    op.add_argument("--data")
    op.add_argument("--macs", type=float, default=0.5)
    op.add_argument("--threads", type=int, default=2)
    op.add_argument("--out", type=Path)
    lp = sub.add_parser("latency", help="StructuredPrune(latency=...) on ResNet-56")
    lp.add_argument("--target", type=float, default=0.6)
    lp.add_argument("--batch", type=int, default=8)
    lp.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.part == "latency":
        result = latency_run(args)
    elif args.part == "oneshot":
        result = oneshot_run(args)
    elif args.part == "hessian":
        result = hessian_run(args)
    elif args.part == "speed":
        result = speed(args)
    elif args.part == "throughput":
        result = throughput_run(args)
    else:
        if args.quick:
            args.macs, args.epochs, args.train_images = [0.5], 1, 256
            args.jpeg_limit, args.repeats = 500, 3
        result = accuracy_run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
