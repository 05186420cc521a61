"""FisherPrune's block refit on all-MiniLM-L6-v2 with little calibration data: does shrinking
each layer's input sums toward their diagonal (``shrinkage``) help where the refit over-fits?

For each calibration size the heads/FFN selection (Fisher scores on those sentences, 50% MACs)
is made once; then the cut alone (``none``), the block refit with its norms as FisherPrune
runs it with ``shrinkage=0`` (the plain ridge, as before) and with ``shrinkage="auto"``.
Scored in PyTorch (mean-pooled embedding cosine to the original, retrieval agreement) on
held-out sentences, sequence length 128:

    .venv/bin/python benchmarks/lm_minilm_shrink_refit.py --calib 16 64 512 --eval 512
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import cpu_flags, markdown_table, write_json
from _transformers_bench import batches
from lm_minilm_refit import score, setup

import netpress as npr
from netpress.prune import posttraining
from netpress.prune.refit import refit_blocks
from netpress.reconstruct.shrinkage import Shrinker

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, nargs="+", default=[16, 64, 512])
    p.add_argument("--eval", type=int, default=512)
    p.add_argument("--macs", type=float, default=0.5)
    p.add_argument("--shrinkage", nargs="+", default=["0", "auto"],
                   help="settings to compare besides the cut alone: 'auto' or numbers")
    p.add_argument("--out", default=str(RESULTS / "lm_minilm_shrink_refit.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    tok, model, texts, evaluate, ref = setup(args.eval)
    rows: list[dict[str, Any]] = []
    for n in args.calib:
        calib = [x for x, _ in batches(tok, texts[:n], 32)]
        x = {k: v[:1] for k, v in calib[0].items()}
        cfg = npr.FisherPrune(macs=args.macs, calibration_batches=len(calib), refit=False)
        fc = posttraining.fisher_cut(model, cfg, x, calib)
        settings = [v if v == "auto" else float(v) for v in args.shrinkage]
        for variant in ["none", *settings]:
            work = copy.deepcopy(fc.model)
            shrinker = Shrinker(variant) if variant != "none" else None
            t0 = time.perf_counter()
            if shrinker is not None:
                refit_blocks(work, fc.original, calib, kept_rows=fc.kept_rows, norms=True,
                             shrinker=shrinker)
            seconds = round(time.perf_counter() - t0, 1)
            alphas = list(shrinker.alpha.values()) if shrinker is not None else [0.0]
            row = {"calib": n, "refit": "none" if shrinker is None else "blocks",
                   "shrinkage": str(variant), **score(work, ref, evaluate),
                   "alpha_mean": round(sum(alphas) / len(alphas), 3),
                   "alpha_max": max(alphas), "refit_s": seconds,
                   "min_rows_per_column": shrinker.summary()["min_rows_per_column"]
                   if shrinker is not None else None}
            rows.append(row)
            print(row, flush=True)
    payload = {"command": "python benchmarks/lm_minilm_shrink_refit.py " + " ".join(sys.argv[1:]),
               "cpu_flags": cpu_flags(), "eval_sentences": args.eval, "macs": args.macs,
               "rows": rows}
    write_json(Path(args.out), payload)
    table = markdown_table(
        ["calib sentences", "refit", "shrinkage", "cosine mean / min", "retrieval agr.",
         "α mean / max", "refit s"],
        [[r["calib"], r["refit"], r["shrinkage"], f"{r['cosine_mean']} / {r['cosine_min']}",
          r["retrieval_agreement"], f"{r['alpha_mean']} / {r['alpha_max']}", r["refit_s"]]
         for r in rows])
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
