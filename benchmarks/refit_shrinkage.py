"""FisherPrune's refit with little calibration data: does shrinking each layer's input sums
toward their diagonal (``shrinkage``) help where the refit over-fits?

``minilm``: all-MiniLM-L6-v2. For each calibration size the heads/FFN selection (Fisher
scores on those sentences, 50% MACs) is made once; then the cut alone (``none``) and the
block refit with its norms as FisherPrune runs it, with each ``--shrinkage`` setting (0: the
plain ridge, as before; ``auto``: the Ledoit-Wolf intensity). Scored in PyTorch (mean-pooled
embedding cosine to the original, retrieval agreement) on held-out sentences, sequence
length 128::

    .venv/bin/python benchmarks/refit_shrinkage.py minilm --calib 16 64 512 --eval 512

``zoo``: tiny random-weight ``transformers`` classes built as ``oneshot_coverage.py`` builds
them (``_hf_zoo.py``; 4 calibration batches of 2 random inputs, a held-out batch of 4),
``FisherPrune(macs=--macs)`` with ``refit=False`` and with each ``--shrinkage`` setting (the
same selection each time), relative output error against the unpruned model::

    .venv/bin/python benchmarks/refit_shrinkage.py zoo Phi3ForCausalLM \
        SegformerForImageClassification

``quant``: does ``Quantize(rounding="gptq")`` (INT8 weights, its own layer Hessians) over-fit
few calibration images? The CIFAR-10 ResNet-20 quantized W8A8 with round to nearest and
with GPTQ rounding on N class-balanced JPEG train images, top-1 agreement with the float
model on the first ``--eval-images`` JPEG test images::

    .venv/bin/python benchmarks/refit_shrinkage.py quant --data ../shared/data --calib 4 16

``structured``: does ``StructuredPrune``'s least-squares refit (``reconstruct=True``)
over-fit few calibration images? The same ResNet-20, ``StructuredPrune(macs=--macs)`` with
and without the refit (without: BatchNorm statistics re-estimated), same agreement::

    .venv/bin/python benchmarks/refit_shrinkage.py structured --data ../shared/data \
        --calib 4 16 64

``sensitivity``: would ``SparseGPT(allocation="sensitivity")`` allocate better from shrunk
Hessians? all-MiniLM-L6-v2, SparseGPT 50% (its own fits with ``shrinkage="auto"``, the
default) with the sensitivity costs from the sample Hessians, from Hessians shrunk by the
Ledoit-Wolf intensity (patched in for this measurement only) and with the uniform
allocation; mean embedding cosine on 512 held-out sentences (``calibration_size.py``'s
data)::

    .venv/bin/python benchmarks/refit_shrinkage.py sensitivity --calib 4 16
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import cpu_flags, markdown_table, write_json
from _hf_zoo import build, entries
from _transformers_bench import batches
from lm_minilm_refit import score, setup
from oneshot_coverage import random_like

import netpress as npr
from netpress._inputs import call_model, primary_output
from netpress.prune import posttraining
from netpress.prune.refit import refit_blocks
from netpress.prune.refit_guard import TOKEN_POWER
from netpress.reconstruct.shrinkage import Shrinker

RESULTS = Path(__file__).parent / "results"


def _settings(values: list[str]) -> list[float | str]:
    return [v if v == "auto" else float(v) for v in values]


def minilm(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ``minilm`` measurement (see the module docs): one row per size and variant."""
    torch.manual_seed(0)
    tok, model, texts, evaluate, ref = setup(args.eval)
    rows: list[dict[str, Any]] = []
    for n in args.calib:
        calib = [x for x, _ in batches(tok, texts[:n], 32)]
        x = {k: v[:1] for k, v in calib[0].items()}
        cfg = npr.FisherPrune(macs=args.macs, calibration_batches=len(calib), refit=False)
        fc = posttraining.fisher_cut(model, cfg, x, calib)
        for variant in ["none", *_settings(args.shrinkage)]:
            work = copy.deepcopy(fc.model)
            shrinker = Shrinker(variant) if variant != "none" else None
            t0 = time.perf_counter()
            chosen: dict[str, float] = {}
            guarded: dict[str, float] = {}
            if shrinker is not None:
                refit_blocks(work, fc.original, calib, kept_rows=fc.kept_rows, norms=True,
                             shrinker=shrinker, damp=args.damp, chosen=chosen,
                             guard=args.guard == "on", guarded=guarded,
                             guard_power=args.guard_power)
            seconds = round(time.perf_counter() - t0, 1)
            alphas = list(shrinker.alpha.values()) if shrinker is not None else [0.0]
            row = {"calib": n, "refit": "none" if shrinker is None else "blocks",
                   "damp": args.damp, "chosen_damps": sorted(set(chosen.values())),
                   "damp_counts": {str(d): list(chosen.values()).count(d)
                                   for d in sorted(set(chosen.values()))},
                   "shrinkage": str(variant), "guard": args.guard,
                   "guard_ratios": [round(v, 3) for v in guarded.values()],
                   **score(work, ref, evaluate),
                   "alpha_mean": round(sum(alphas) / len(alphas), 3),
                   "alpha_max": max(alphas), "refit_s": seconds,
                   "min_rows_per_column": shrinker.summary()["min_rows_per_column"]
                   if shrinker is not None else None}
            rows.append(row)
            print(row, flush=True)
    _write_table(
        args.out,
        ["calib sentences", "refit", "shrinkage", "cosine mean / min", "retrieval agr.",
         "α mean / max", "refit s"],
        [[r["calib"], r["refit"], r["shrinkage"], f"{r['cosine_mean']} / {r['cosine_min']}",
          r["retrieval_agreement"], f"{r['alpha_mean']} / {r['alpha_max']}", r["refit_s"]]
         for r in rows])
    return rows


def _write_table(out: str, header: list[str], rows: list[list[Any]]) -> None:
    """The results table as markdown beside ``out``'s JSON, and printed."""
    table = markdown_table(header, rows)
    Path(out).with_suffix(".md").write_text(table + "\n")
    print(table)


def _out(model: torch.nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        return primary_output(call_model(model, x)).float()


def zoo(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ``zoo`` measurement (see the module docs): one row per class."""
    by_name = {e.class_name: e for e in entries()}
    rows: list[dict[str, Any]] = []
    for name in args.classes:
        model, x = build(by_name[name])
        vocab = max(4, min(getattr(model.config, "vocab_size", None) or 512, 512))
        calib = [(random_like(x, 2, 100 + i, vocab), None) for i in range(4)]
        held = random_like(x, 4, 7, vocab)
        ref = _out(model, held)
        row: dict[str, Any] = {"class": name, "macs": args.macs}
        for variant in ["none", *_settings(args.shrinkage)]:
            cfg = npr.FisherPrune(macs=args.macs, refit=variant != "none", damp=args.damp,
                                  shrinkage=0.0 if variant == "none" else variant)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = npr.compress(model, [cfg], calibration=calib, example_inputs=x,
                                   measure=False)
            out = _out(res.model, held)
            row[str(variant)] = round(float((out - ref).norm() / ref.norm()), 4)
            step = res.report["steps"][0]
            if "refit_guard" in step:
                row[f"guard_{variant}"] = step["refit_guard"]
            if variant == "auto":
                alphas = list(step["shrinkage"].values())
                row["alpha_mean"] = round(sum(alphas) / max(len(alphas), 1), 3)
                row["alpha_max"] = max(alphas, default=0.0)
                row["min_rows_per_column"] = step["min_rows_per_column"]
        rows.append(row)
        print(row, flush=True)
    keys = ["none", *[str(v) for v in _settings(args.shrinkage)]]
    _write_table(args.out, ["class", *[f"rel. error, {k}" for k in keys],
                    "α mean / max", "rows per column"],
                   [[r["class"], *[r[k] for k in keys],
                     f"{r.get('alpha_mean')} / {r.get('alpha_max')}",
                     r.get("min_rows_per_column")] for r in rows])
    return rows


def _cifar(args: argparse.Namespace, what: str) -> list[dict[str, Any]]:
    """The ``quant`` and ``structured`` measurements (see the module docs)."""
    from _common import Timer, agreement, data_dir, logits

    from netpress import datasets as ds
    from netpress.models import find_pretrained, load_pretrained_cifar_resnet

    root = data_dir(args.data)
    ref = load_pretrained_cifar_resnet(20, find_pretrained(20, root))
    evals = ds.cifar10_jpeg_test(root, limit=args.eval_images)
    base = logits(ref, evals)
    variants: dict[str, Any] = {
        "quant": {"rounding nearest": npr.Quantize(rounding="nearest"),
                  "rounding gptq": npr.Quantize(rounding="gptq")},
        "structured": {"refit": npr.StructuredPrune(macs=args.macs),
                       "no refit": npr.StructuredPrune(macs=args.macs, reconstruct=False)},
    }[what]
    rows: list[dict[str, Any]] = []
    for n in args.calib:
        x, y = ds.cifar10_jpeg_train(root, limit=n, seed=0).tensors
        calib = [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)]
        for label, method in variants.items():
            with Timer() as t, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = npr.compress(ref, [method], calibration=calib, measure=False,
                                   example_inputs=x[:1], seed=0)
            row = {"images": n, "variant": label,
                   "agreement": round(agreement(base, logits(res.model, evals)), 4),
                   "seconds": round(t.seconds, 1)}
            rows.append(row)
            print(row, flush=True)
    _write_table(args.out, ["images", "variant", "top-1 agreement", "s"],
                   [[r["images"], r["variant"], r["agreement"], r["seconds"]]
                    for r in rows])
    return rows


def sensitivity(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ``sensitivity`` measurement (see the module docs): one row per size and variant."""
    from _minilm_text import _embed, load_minilm, minilm_batches, sentences

    from netpress.reconstruct import sparse
    from netpress.reconstruct.shrinkage import intensity, shrink_

    plain = sparse.collect_statistics

    def shrunk_stats(*a: Any, **k: Any) -> Any:
        stats = plain(*a, **k)
        for st in stats.values():
            for h in st.hessian if st.hessian is not None else []:
                shrink_(h, intensity("auto", h, st.samples))
        return stats

    tok, ref = load_minilm()
    text = sentences(512 + args.eval)
    evals = minilm_batches(tok, text[512:512 + args.eval])
    base = _embed(ref, evals)
    rows: list[dict[str, Any]] = []
    for n in args.calib:
        calib = minilm_batches(tok, text[:n])
        for label, alloc, stats in (("sensitivity, sample Hessians", "sensitivity", plain),
                                    ("sensitivity, shrunk Hessians", "sensitivity",
                                     shrunk_stats),
                                    ("uniform", "uniform", plain)):
            sparse.collect_statistics = stats  # type: ignore[assignment]
            try:
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = npr.compress(ref, [npr.SparseGPT(sparsity=0.5, allocation=alloc)],
                                       calibration=calib, measure=False)
            finally:
                sparse.collect_statistics = plain  # type: ignore[assignment]
            cos = torch.nn.functional.cosine_similarity(
                base.double(), _embed(res.model, evals).double(), dim=1)
            row = {"sentences": n, "variant": label, "cosine": round(float(cos.mean()), 4),
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(row, flush=True)
    _write_table(args.out, ["sentences", "allocation", "cosine", "s"],
                   [[r["sentences"], r["variant"], r["cosine"], r["seconds"]]
                    for r in rows])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("minilm", "zoo", "quant", "structured", "sensitivity"))
    p.add_argument("classes", nargs="*", help="zoo: the transformers classes")
    p.add_argument("--calib", type=int, nargs="+", default=[16, 64, 512])
    p.add_argument("--eval", type=int, default=512)
    p.add_argument("--macs", type=float, default=0.5)
    p.add_argument("--damp", type=lambda v: v if v == "auto" else float(v), default=0.01,
                   help="minilm, zoo: the refit's ridge (a number, or auto: cross-validated)")
    p.add_argument("--guard", choices=("on", "off"), default="on",
                   help="minilm, zoo: the block refit's held-out guard (refit_guard.py; "
                        "only with --damp auto)")
    p.add_argument("--guard-power", type=float, default=TOKEN_POWER,
                   help="minilm, zoo: the guard's q, how much the worst tokens weigh "
                        "(refit_blocks' guard_power, default 4; 1: the total squared error)")
    p.add_argument("--shrinkage", nargs="+", default=["0", "auto"],
                   help="settings to compare besides no refit: 'auto' or numbers")
    p.add_argument("--data", default=None, help="quant: the shared data folder")
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.out = args.out or str(RESULTS / f"refit_shrinkage_{args.what}.json")
    if args.guard == "off" or args.guard_power != TOKEN_POWER:  # FisherPrune's block refit
        posttraining.refit_blocks = functools.partial(  # type: ignore[assignment]
            refit_blocks, guard=args.guard == "on", guard_power=args.guard_power)
    modes = {"minilm": minilm, "zoo": zoo, "sensitivity": sensitivity}
    rows = modes[args.what](args) if args.what in modes else _cifar(args, args.what)
    write_json(Path(args.out), {
        "command": "python benchmarks/refit_shrinkage.py " + " ".join(sys.argv[1:]),
        "cpu_flags": cpu_flags(), "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
