"""A distilled all-MiniLM-L6-v2 student refitted towards the original again, with no training.

Does the closed-form block refit (:func:`netpress.prune.refit.refit_blocks`, the one
``FisherPrune`` runs after its cut) still help *after* distillation? The student (a
``torch.save``\\ d pruned model, e.g. from ``lm_minilm_distill.py --setting '{"save": ...}'``)
is refitted on the first ``--calib`` documentation sentences, only in the chosen layers:

* ``sinks``: the layers that write into the residual stream (each block's
  ``attention.output.dense`` and ``output.dense``), whose targets need no kept-row map;
* ``ffn_out``: only the FFN output layers;
* ``norms``: only the blocks' LayerNorm gains and shifts;
* ``sinks+norms``: both.

Each refit starts from the same student; all are scored on the last ``--eval`` documentation
sentences (mean-pooled embedding cosine to the original, retrieval agreement)::

    .venv/bin/python benchmarks/lm_minilm_postrefit.py --student STUDENT.pt --calib 1024 \\
        --mode sinks --mode norms --out benchmarks/results/lm_minilm_postrefit.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import cpu_flags, write_json
from _transformers_bench import batches
from lm_minilm_refit import score, setup

from netpress.prune.refit import refit_blocks

MODES = ("sinks", "ffn_out", "norms", "sinks+norms")


def layers(student: torch.nn.Module, mode: str) -> set[str]:
    """The full names of ``student``'s layers that ``mode`` refits (see the module docs)."""
    attn = {n for n, _ in student.named_modules() if n.endswith("attention.output.dense")}
    ffn = {n for n, _ in student.named_modules()
           if n.endswith(".output.dense") and n not in attn}
    norms = {n for n, m in student.named_modules()
             if isinstance(m, torch.nn.LayerNorm) and ".layer." in n}
    return {"sinks": attn | ffn, "ffn_out": ffn, "norms": norms,
            "sinks+norms": attn | ffn | norms}[mode]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True, help="torch.save'd distilled model")
    p.add_argument("--calib", type=int, default=1024)
    p.add_argument("--eval", type=int, default=512)
    p.add_argument("--mode", action="append", choices=MODES, required=True)
    p.add_argument("--damp", default="auto", help="'auto' or a relative ridge")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    damp: float | str = args.damp if args.damp == "auto" else float(args.damp)
    tok, model, texts, evaluate, ref = setup(args.eval)
    student = torch.load(args.student, weights_only=False).eval()
    calib = [x for x, _ in batches(tok, texts[:args.calib], 32, pad="longest")]
    rows: list[dict[str, Any]] = [{"mode": "none", **score(student, ref, evaluate)}]
    print(rows[-1], flush=True)
    for mode in args.mode:
        refitted = copy.deepcopy(student)
        started = time.perf_counter()
        done = refit_blocks(refitted, model, calib, damp=damp, only=layers(student, mode),
                            norms="norms" in mode)
        rows.append({"mode": mode, "layers": len(done),
                     "seconds": round(time.perf_counter() - started),
                     **score(refitted, ref, evaluate)})
        print(rows[-1], flush=True)
    write_json(Path(args.out), {"command": "python benchmarks/lm_minilm_postrefit.py "
                                + " ".join(sys.argv[1:]), "cpu_flags": cpu_flags(),
                                "calibration_sentences": args.calib, "damp": args.damp,
                                "rows": rows})


if __name__ == "__main__":
    main()
