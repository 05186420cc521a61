"""Scale check: BERT-base (110M parameters, random weights from its config) through netpress's
one-shot transformer compressions on this machine: wall time and peak memory.

Each method runs in its own child process; its peak resident memory (``ru_maxrss``) is
compared with the FP32 model's size (4 bytes per parameter) and with the process's peak
right after building the model (torch + the model itself). Methods: FisherPrune (heads +
FFN, 50% MACs, Fisher scores and least-squares refit), StructuredPrune (L2, 50% MACs),
DepthPrune (3 of 12 blocks), and SparseGPT 50% / GPTQ 4-bit when this netpress has them.

    .venv/bin/python benchmarks/lm_scale.py [--calib-batches 4 --batch 8 --seq 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import cpu_flags, markdown_table, write_json

HERE = Path(__file__).parent
METHODS = ("FisherPrune", "StructuredPrune", "DepthPrune", "SparseGPT", "GPTQ")


def _recipe(name: str) -> list[Any]:
    import netpress as npr

    if name == "FisherPrune":
        return [npr.FisherPrune(macs=0.5, calibration_batches=4)]
    if name == "StructuredPrune":
        return [npr.StructuredPrune(macs=0.5)]
    if name == "DepthPrune":
        return [npr.DepthPrune(blocks=0.25, calibration_batches=2)]
    from netpress import reconstruct  # issue 11's methods; ImportError when absent

    if name == "SparseGPT":
        return [reconstruct.SparseGPT(sparsity=0.5)]
    return [reconstruct.GPTQ(bits=4, group_size=128)]


def child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    import netpress as npr
    from netpress._inputs import take_batch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the model
    # transformers imports its BERT code lazily, on first use of the class: ~128 MiB of
    # modules that the model's own size does not include (a fourth basis, `_code`)
    bert = transformers.BertModel
    code = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = bert(transformers.BertConfig()).eval()
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    data = [({"input_ids": torch.randint(0, 30522, (args.batch, args.seq), generator=gen),
              "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long)}, None)
            for _ in range(args.calib_batches)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        recipe = _recipe(name)
    except (ImportError, AttributeError) as exc:
        return {"method": name, "skipped": f"not available in this netpress ({exc})"}
    started = time.perf_counter()
    # example_inputs: one row (1 x seq), as compress() takes by default from evaluation data;
    # the traced forward of StructuredPrune / FisherPrune keeps every activation of the example
    res = npr.compress(model, recipe, calibration=data, example_inputs=take_batch(data[0][0], 1),
                       measure=False)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": name, "params": params, "fp32_mb": round(params * 4 / 2**20, 1),
            "seconds": round(seconds, 1), "peak_rss_mb": round(peak / 2**20, 1),
            "rss_after_build_mb": round(base / 2**20, 1),
            "rss_before_model_mb": round(runtime / 2**20, 1),
            "rss_with_bert_code_mb": round(code / 2**20, 1),
            # the model and everything compression adds: peak less Python + torch + netpress
            "model_and_added_over_fp32": round((peak - runtime) / (params * 4), 2),
            # the same, counting transformers' BERT modules (imported at first use) as runtime
            "model_and_added_over_fp32_code": round((peak - code) / (params * 4), 2),
            "peak_over_fp32": round(peak / (params * 4), 2),
            "added_over_fp32": round((peak - base) / (params * 4), 2),
            "params_after": sum(p.numel() for p in res.model.parameters())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(HERE / "results" / "lm_scale.json"))
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows = []
    for name in args.methods:
        cmd = [sys.executable, __file__, "--child", name, "--calib-batches",
               str(args.calib_batches), "--batch", str(args.batch), "--seq", str(args.seq),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"method": name, "failed": proc.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    payload = {"model": "BERT-base (BertConfig(), random weights)", "cpu_flags": cpu_flags(),
               "calibration": f"{args.calib_batches} x {args.batch} x {args.seq} tokens",
               "command": "python benchmarks/lm_scale.py " + " ".join(argv or sys.argv[1:]),
               "rows": rows}
    out = Path(args.out)
    write_json(out, payload)
    table = markdown_table(
        ["method", "wall s", "RSS after build MB", "peak RSS MB", "FP32 model MB",
         "peak / FP32", "added / FP32", "(peak - runtime) / FP32",
         "(peak - runtime with BERT code) / FP32"],
        [[r["method"], r.get("seconds", "-"), r.get("rss_after_build_mb", "-"),
          r.get("peak_rss_mb", "-"), r.get("fp32_mb", "-"),
          r.get("peak_over_fp32", r.get("skipped", r.get("failed", "-"))),
          r.get("added_over_fp32", "-"), r.get("model_and_added_over_fp32", "-"),
          r.get("model_and_added_over_fp32_code", "-")]
         for r in rows])
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
