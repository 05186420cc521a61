"""Padding tokens in the calibration statistics: SparseGPT / GPTQ / Wanda on all-MiniLM-L6-v2
calibrated on batches padded to a fixed length, with the padding positions left out of the
layers' statistics (netpress now) and kept in (the behaviour before), against the same
sentences in length-sorted batches (little padding: what ``oneshot.py minilm`` does).
``--methods`` also takes ``DynamicQuantize`` (its outlier channels come from the calibration
inputs) and SparseGPT with its LayerNorm refit.

Calibration: ``--calibration`` sentences (pydoc topics, the first ones), batches of 32 in
their natural order padded to ``--length`` tokens (what ``tokenizer(..., padding="max_length")``
gives a user); evaluation: the next ``--eval`` sentences, embedding cosine with the
uncompressed model (mean-pooled) and retrieval agreement::

    python benchmarks/padding_calibration.py --out benchmarks/results/padding_calibration.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import cpu_flags, markdown_table, write_json
from _minilm_text import _embed, load_minilm, minilm_batches, sentences

import netpress as npr
from netpress.measure.text import retrieval_agreement
from netpress.quant import dynamic
from netpress.reconstruct import engine, norms

METHODS = {"SparseGPT 50%": lambda: npr.SparseGPT(sparsity=0.5),
           "GPTQ 4-bit g128": lambda: npr.GPTQ(bits=4, group_size=128),
           "Wanda 50%": lambda: npr.Wanda(sparsity=0.5),
           "DynamicQuantize (INT8)": lambda: npr.DynamicQuantize(),
           "SparseGPT 50% + refit_norms": lambda: npr.SparseGPT(sparsity=0.5, refit_norms=True)}
#: the modules that read the batches' real tokens (patched for the "before" rows)
READERS = (engine, dynamic, norms)


def padded(tok: Any, lines: list[str], length: int) -> list[Any]:
    """Batches of 32 in the given order, every one padded to ``length`` tokens."""
    out = []
    for i in range(0, len(lines), 32):
        enc = tok(lines[i:i + 32], padding="max_length", truncation=True, max_length=length,
                  return_tensors="pt")
        out.append(({"input_ids": enc["input_ids"],
                     "attention_mask": enc["attention_mask"]}, None))
    return out


def run(method: str, ref: torch.nn.Module, calib: list[Any], evals: list[Any],
        base: torch.Tensor, keep_padding: bool) -> dict[str, Any]:
    saved = [m.token_mask for m in READERS]
    if keep_padding:  # every input row counts, padding included (the behaviour before)
        for m in READERS:
            m.token_mask = lambda inputs: None  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        res = npr.compress(ref, [METHODS[method]()], calibration=calib,
                           example_inputs=calib[0][0], measure=False)
        seconds = time.perf_counter() - started
    finally:
        for m, f in zip(READERS, saved):
            m.token_mask = f  # type: ignore[assignment]
    emb = _embed(res.model, evals)
    cos = torch.nn.functional.cosine_similarity(base.double(), emb.double(), dim=1)
    return {"cosine_mean": round(float(cos.mean()), 4), "cosine_min": round(float(cos.min()), 4),
            "retrieval_agreement": round(retrieval_agreement(base, emb), 4),
            "seconds": round(seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration", type=int, default=128)
    p.add_argument("--eval", type=int, default=512)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--methods", nargs="*", default=list(METHODS)[:3], choices=list(METHODS))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results"
                   / "padding_calibration.json")
    args = p.parse_args()
    torch.manual_seed(0)
    tok, ref = load_minilm()
    text = sentences(args.calibration + args.eval)
    lines, evals = text[:args.calibration], minilm_batches(tok, text[args.calibration:])
    base = _embed(ref, evals)
    fixed = padded(tok, lines, args.length)
    real = sum(int(b["attention_mask"].sum()) for b, _ in fixed)
    total = sum(b["attention_mask"].numel() for b, _ in fixed)
    settings = [("padded, padding left out (netpress)", fixed, False),
                ("padded, padding kept (before)", fixed, True),
                ("length-sorted batches", minilm_batches(tok, lines), False)]
    rows = []
    for method in args.methods:
        for label, calib, keep in settings:
            rows.append({"method": method, "calibration": label,
                         **run(method, ref, calib, evals, base, keep)})
            print(rows[-1], flush=True)
    cols = ["method", "calibration", "cosine_mean", "cosine_min", "retrieval_agreement",
            "seconds"]
    table = markdown_table(cols, [[r[c] for c in cols] for r in rows])
    write_json(args.out, {"command": "python benchmarks/padding_calibration.py "
                          + " ".join(sys.argv[1:]), "cpu_flags": cpu_flags(),
                          "real_tokens": real, "padded_positions": total, "rows": rows})
    args.out.with_suffix(".md").write_text(
        f"CPU flags: {cpu_flags()}; {args.calibration} calibration sentences padded to "
        f"{args.length}: {real} real tokens of {total} positions\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
