"""FisherPrune on all-MiniLM-L6-v2 without training: how the 50% MACs are spread over layers.

Every variant reuses one set of Fisher scores (calibration sentences padded to the longest)
and differs in the selection (``--rank``: which units of a group go, ``FisherPrune(rank=)``;
``min_fraction``: each layer keeps at least that fraction of
its heads and of its FFN neurons; 0 = the global ranking by Fisher per MAC; `auto` = the
library default, a floor set from the target) and in whether
the LayerNorm gains/shifts are refitted after the Linear layers (``refit_norms``). Measured
in PyTorch on the held-out sentences (mean-pooled embedding cosine to the original,
retrieval agreement), sequence length 128.

    .venv/bin/python benchmarks/lm_minilm_allocation.py --calib 512 --eval 512 \\
        --variant 0:0 --variant 0:1 --variant 0.25:1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import cpu_flags, markdown_table, write_json
from _transformers_bench import batches, train_pool
from lm_minilm_refit import score, setup

import netpress as npr
from netpress.prune import posttraining

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--eval", type=int, default=512)
    p.add_argument("--macs", type=float, default=0.5)
    p.add_argument("--variant", action="append", required=True,
                   help="MIN_FRACTION:REFIT_NORMS, e.g. 0.25:1; MIN_FRACTION 'auto' (the default "
                   "floor set from the target) or 'auto@SHARE' (min_share=SHARE)")
    p.add_argument("--calib-data", default=None,
                   help="calibrate on the first --calib sentences of a distillation pool "
                        "(_transformers_bench.train_pool: topics, topics+docstrings, ...) "
                        "instead of the first documentation sentences; the last --held-out "
                        "documentation sentences stay out")
    p.add_argument("--held-out", type=int, default=768,
                   help="with --calib-data: documentation sentences kept out (512 evaluated "
                        "+ lm_minilm_distill.py's 256-sentence --select slice)")
    p.add_argument("--rank", nargs="+", default=["obs"], choices=["obs", "fisher"],
                   help="FisherPrune(rank=...) for every variant: which units of a group go "
                        "(group OBS on the reading layer, or Fisher score); several run side "
                        "by side on the same Fisher scores")
    p.add_argument("--save", default=None, help="torch.save the best variant's model here")
    p.add_argument("--out", default=str(RESULTS / "lm_minilm_allocation.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    tok, model, texts, evaluate, ref = setup(args.eval)
    pool = texts if args.calib_data is None else \
        train_pool(texts, args.calib_data, held_out=args.held_out)
    calib = [x for x, _ in batches(tok, pool[:args.calib], 32, pad="longest")]
    x = {k: v[:1] for k, v in calib[0].items()}
    scores: dict[str, Any] = {}
    fisher = posttraining._fisher

    def cached(*a: Any, **k: Any) -> Any:  # one Fisher pass for every variant
        if "s" not in scores:
            scores["s"] = fisher(*a, **k)
        return scores["s"]

    posttraining._fisher = cached  # type: ignore[assignment]
    rows: list[dict[str, Any]] = []
    best: tuple[float, torch.nn.Module | None] = (-1.0, None)
    for v, rank in [(v, r) for v in args.variant for r in args.rank]:
        frac, norms = v.split(":")
        auto, _, share = frac.partition("@")
        floor = {"min_fraction": None, "min_share": float(share or 0.9)} if auto == "auto" \
            else {"min_fraction": float(frac)}
        cfg = npr.FisherPrune(macs=args.macs, calibration_batches=len(calib),
                              refit_norms=norms == "1", rank=rank, **floor)
        started = time.perf_counter()
        pruned, summary = posttraining.fisher_prune(model, cfg, x, calib)
        seconds = round(time.perf_counter() - started)
        kept = {k.split(".weight")[0]: v[1] for k, v in summary["groups"].items()}
        rows.append({"min_fraction": summary["min_fraction"], "floor": frac, "rank": rank,
                     "refit_norms": norms == "1",
                     "macs_ratio": round(summary["macs_after"] / summary["macs_before"], 4),
                     "seconds": seconds, "kept": kept, **score(pruned, ref, evaluate)})
        print(rows[-1], flush=True)
        if rows[-1]["cosine_mean"] > best[0]:
            best = (rows[-1]["cosine_mean"], pruned)
    if args.save and best[1] is not None:
        torch.save(best[1], args.save)
    write_json(Path(args.out), {"command": "python benchmarks/lm_minilm_allocation.py "
                                + " ".join(sys.argv[1:]), "cpu_flags": cpu_flags(),
                                "calibration_sentences": args.calib,
                                "calibration_data": args.calib_data or "topics",
                                "eval_sentences": args.eval, "rows": rows})
    table = markdown_table(["min_fraction", "refit_norms", "rank", "MACs", "cosine mean / min",
                            "retrieval agr.", "s"],
                           [[r["min_fraction"], r["refit_norms"], r["rank"], r["macs_ratio"],
                             f"{r['cosine_mean']} / {r['cosine_min']}",
                             r["retrieval_agreement"], r["seconds"]] for r in rows])
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
