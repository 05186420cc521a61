"""The exported attention of all-MiniLM-L6-v2 in ONNX Runtime: torch's own symbolic for
``scaled_dot_product_attention`` (a NaN guard over every layer's weights) against netpress's
lean form (``netpress.export._sdpa``) and ``attn_implementation="eager"``, FP32 and netpress
INT8 (``DynamicQuantize``), side by side in one process.

    .venv/bin/python benchmarks/sdpa_export.py [--eval 512] [--threads 1] [--out FILE.json]

For each variant: the graph's node count and ``Where``/``IsNaN`` nodes, the largest absolute
difference from the PyTorch model's embeddings and the mean cosine on the held-out sentences,
and the median latency at batch 1 and 32 (sequence length 128) over interleaved rounds, with
each one's ratio to torch's form at the same precision. The torch form is exported with
netpress's symbolic taken out of its private table for that one export.
"""

from __future__ import annotations

import argparse
import collections
import copy
import tempfile
from pathlib import Path
from typing import Any

import onnx
import torch
from _common import cpu_flags, markdown_table, write_json
from _minilm_text import embed, minilm

import netpress as npr
from netpress.export import _symbolics
from netpress.export.onnx import OrtModule, export_onnx
from netpress.measure import measure_latency_interleaved
from netpress.measure.text import retrieval_agreement

_SDPA = "aten::scaled_dot_product_attention"


def _export(model: torch.nn.Module, path: Path, x: Any, form: str) -> Path:
    if form != "torch":
        return export_onnx(model, path, x)
    own = _symbolics._SYMBOLICS.pop(_SDPA)
    try:
        return export_onnx(model, path, x)
    finally:
        _symbolics._SYMBOLICS[_SDPA] = own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", type=int, default=512, help="held-out sentences")
    parser.add_argument("--calib", type=int, default=256, help="calibration sentences")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    model, calib, evaluate, x = minilm(args.calib, args.eval)
    ref = embed(model, evaluate)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    files: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "int8"):
            for form, base in (("torch", model), ("netpress", model), ("eager", eager)):
                m = base if precision == "fp32" else npr.compress(
                    base, [npr.DynamicQuantize()], calibration=calib, example_inputs=x,
                    measure=False).model
                files[f"{precision}_{form}"] = _export(m, Path(tmp) / f"{precision}_{form}.onnx",
                                                       x, form)
        rows: dict[str, dict[str, Any]] = {}
        modules = {}
        for name, path in files.items():
            ops = collections.Counter(n.op_type for n in onnx.load(
                str(path), load_external_data=False).graph.node)
            modules[name] = OrtModule(path, threads=args.threads)
            emb = embed(modules[name], evaluate)
            cos = torch.nn.functional.cosine_similarity(ref.double(), emb.double(), dim=-1)
            rows[name] = {"nodes": sum(ops.values()), "where": ops["Where"],
                          "isnan": ops["IsNaN"],
                          "max_abs_diff": float((emb - ref).abs().max()),
                          "cosine_mean": round(float(cos.mean()), 6),
                          "retrieval_agreement": round(retrieval_agreement(ref, emb), 4)}
            print(name, rows[name], flush=True)
        names = list(modules)
        lat = measure_latency_interleaved([modules[n] for n in names], x, batch_sizes=(1, 32),
                                          threads=args.threads, repeats=args.repeats,
                                          warmup=3, rounds=args.rounds)
    for name, stats in zip(names, lat):
        rows[name]["latency_ms"] = {b: round(s.median_ms, 2) for b, s in stats.items()}
    for name in names:
        base = rows[f"{name.split('_')[0]}_torch"]["latency_ms"]
        rows[name]["speedup_vs_torch_form"] = {
            b: round(base[b] / rows[name]["latency_ms"][b], 3) for b in base}
    table = [[n, r["nodes"], r["where"], r["isnan"], f"{r['max_abs_diff']:.2e}",
              r["cosine_mean"], r["latency_ms"][1], r["latency_ms"][32],
              f"{r['speedup_vs_torch_form'][1]:.2f}x / {r['speedup_vs_torch_form'][32]:.2f}x"]
             for n, r in rows.items()]
    md = markdown_table(["variant", "nodes", "Where", "IsNaN", "max abs diff", "cosine",
                         "b1 ms", "b32 ms", "vs torch form b1 / b32"], table)
    print(md)
    if args.out:
        write_json(args.out, {"cpu_flags": cpu_flags(), "threads": args.threads,
                              "eval_sentences": args.eval, "rows": rows})
        args.out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
