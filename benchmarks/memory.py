"""Peak memory of pruning, quantization, save and load on BERT-base (random weights).

Each stage runs in a fresh subprocess: it builds ``BertModel(BertConfig())`` (seeded random
weights, FP32, 418 MiB), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``),
runs the stage and reports ``VmHWM`` (peak resident memory) minus the resident memory before
the stage, as a multiple of the model's FP32 bytes (``ratio``: what the operation adds, with
the model already in memory), and the absolute peak as a multiple too (``peak_absolute_ratio``:
it includes the ~380 MiB Python/torch/transformers runtime and the caller's model). The
stages:

* ``prune``: ``npr.compress(model, StructuredPrune(macs=0.5), measure=False)``
* ``prune_inplace``: the same with ``inplace=True`` (no working copy of the model)
* ``quantize``: ``npr.compress(model, WeightOnly(bits=8), measure=False)``
* ``save``: ``save_artefact(path, model)`` of the FP32 model
* ``load``: ``load_artefact(path, model=BertModel(BertConfig()))`` (the template is built before
  the baseline is taken: it is the caller's, like the model given to ``compress``)

Run: ``python benchmarks/memory.py [--seq 128] [--stages prune,quantize,save,load]``.
Writes ``benchmarks/results/memory.json`` and ``memory.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STAGES = ("prune", "prune_inplace", "quantize", "save", "load")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _bert() -> Any:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig()).eval()


def run_stage(stage: str, seq: int, workdir: Path) -> dict[str, Any]:
    """Run one stage in this process and measure it (called in the child)."""
    import torch

    import netpress as npr
    from netpress.export import load_artefact, save_artefact

    torch.set_num_threads(1)
    model = _bert()
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    x = torch.randint(0, 30522, (1, seq), generator=torch.Generator().manual_seed(1))
    path = workdir / "bert.npress"
    template = None
    if stage == "load":
        save_artefact(path, model)
        template, model = _bert(), None
    import gc

    gc.collect()
    before = _rss_kib("VmRSS")
    _reset_peak()
    if stage == "prune":
        out = npr.compress(model, npr.StructuredPrune(macs=0.5), example_inputs=(x,),
                           measure=False).model
    elif stage == "prune_inplace":
        out = npr.compress(model, npr.StructuredPrune(macs=0.5), example_inputs=(x,),
                           measure=False, inplace=True).model
    elif stage == "quantize":
        out = npr.compress(model, npr.WeightOnly(bits=8), example_inputs=(x,),
                           measure=False).model
    elif stage == "save":
        save_artefact(path, model)
        out = None
    else:
        out = load_artefact(path, model=template).model
    peak = _rss_kib("VmHWM")
    del out
    return {"stage": stage, "model_bytes": model_bytes, "rss_before_kib": before,
            "peak_kib": peak, "peak_over_before_bytes": (peak - before) * 1024,
            "ratio": round((peak - before) * 1024 / model_bytes, 2),
            "peak_absolute_ratio": round(peak * 1024 / model_bytes, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=128, help="tokens in the example input")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    ap.add_argument("--label", default="after", help="label of this run in the JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            print("RESULT " + json.dumps(run_stage(args.child, args.seq, Path(tmp))))
        return
    rows = []
    for stage in args.stages.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", stage, "--seq",
                               str(args.seq)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"stage {stage} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(line[0][len("RESULT "):])
        print(f"{stage:9s} peak over baseline {row['peak_over_before_bytes'] / 2**20:8.1f} MiB "
              f"= {row['ratio']:.2f}x the FP32 model ({row['model_bytes'] / 2**20:.0f} MiB); "
              f"absolute peak RSS {row['peak_kib'] / 1024:.0f} MiB", flush=True)
        rows.append(row)
    results: dict[str, Any] = {}
    if args.out.exists():
        results = json.loads(args.out.read_text())
    old = {r["stage"]: r for r in results.get(args.label, {}).get("rows", [])}
    old.update({r["stage"]: r for r in rows})
    results[args.label] = {"seq": args.seq, "rows": list(old.values())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
