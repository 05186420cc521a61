"""Compression of the small decoder LM trained here (benchmarks/lm_build.py), side by side.

Perplexity on the held-out split (every 20th document of the corpus, never trained on) and
next-token top-1 agreement, mean per-token KL and top-5 overlap with the dense model
(netpress.measure.LanguageModelTask), for: dense; magnitude pruning of every block Linear to
50% (per layer); Wanda and SparseGPT 50% and SparseGPT 2:4; round-to-nearest 4-bit (per
channel, and on GPTQ's grid: group 128); GPTQ 4-bit g128; depth pruning of 25% of the blocks
(DepthPrune(blocks=0.25): 2 of 6, rounded) and of 1 of 6, with and without a short
distillation; FisherPrune (heads + FFN, post-training) to 75% and 50% MACs, each with the
units within a group chosen by group OBS (the default) and by Fisher score. Calibration
windows come from the training split. The JSON and markdown are rewritten after every row,
so a run cut short keeps the rows it finished.

    .venv/bin/python benchmarks/lm.py          # builds the LM first if it is not cached
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import cpu_flags, markdown_table, write_json

import netpress as npr
from netpress.measure.text import LanguageModelTask
from netpress.models.hf import from_pretrained

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from lm_build import CACHE, ensure  # noqa: E402

BLOCK_LINEARS = r"re:model\.layers\.\d+\.(self_attn|mlp)\..*"


def windows(tokens: torch.Tensor, n: int, seq: int, *, seed: int | None = None,
            batch: int = 16) -> list[Any]:
    """``n`` windows of ``seq`` tokens as (inputs, None) batches: consecutive non-overlapping
    windows without a seed, random ones with it."""
    if seed is None:
        starts = [i * seq for i in range(min(n, (tokens.numel() - 1) // seq))]
    else:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, tokens.numel() - seq - 1, (n,), generator=gen).tolist()
    rows = torch.stack([tokens[s:s + seq].long() for s in starts])
    return [({"input_ids": rows[i:i + batch]}, None) for i in range(0, len(rows), batch)]


def recipes(args: argparse.Namespace) -> dict[str, list[Any]]:
    """The variants in the order they run: the issue's list first, FisherPrune last."""
    from netpress.reconstruct import GPTQ, SparseGPT, Wanda

    def distill() -> Any:
        return npr.Distill(max_steps=args.distill_steps, temperature=1.0, alpha=1.0, lr=3e-4,
                           optimizer="adamw")

    out: dict[str, list[Any]] = {  # the goal's rows first: a run cut short still has them
        "sparsegpt50": [SparseGPT(sparsity=0.5, layers=(BLOCK_LINEARS,))],
        "magnitude50": [npr.LayerwiseMagnitudePrune(sparsity=0.5, layers=(BLOCK_LINEARS,))],
        "gptq4_g128": [GPTQ(bits=4, group_size=128, layers=(BLOCK_LINEARS,))],
        "rtn4_g128": [GPTQ(bits=4, group_size=128, rounding="nearest", layers=(BLOCK_LINEARS,))],
        "wanda50": [Wanda(sparsity=0.5, layers=(BLOCK_LINEARS,))],
        "sparsegpt_2of4": [SparseGPT(sparsity=0.5, pattern="2:4", layers=(BLOCK_LINEARS,))],
        "rtn4": [npr.WeightOnly(bits=4, layers=(BLOCK_LINEARS,), weight_observer="minmax")],
        "depth25": [npr.DepthPrune(blocks=0.25)],
        "depth1of6": [npr.DepthPrune(blocks=1 / 6)],
    }
    if args.distill_steps:
        out["depth25_distill"] = [npr.DepthPrune(blocks=0.25), distill()]
        out["depth1of6_distill"] = [npr.DepthPrune(blocks=1 / 6), distill()]
    out["fisher75"] = [npr.FisherPrune(macs=0.75)]
    out["fisher50"] = [npr.FisherPrune(macs=0.5)]
    # the units within each group chosen by Fisher score (Kwon et al.) instead of group OBS
    out["fisher75_fisher_rank"] = [npr.FisherPrune(macs=0.75, rank="fisher")]
    out["fisher50_fisher_rank"] = [npr.FisherPrune(macs=0.5, rank="fisher")]
    return out


def write(out: Path, payload: dict[str, Any]) -> None:
    """The JSON and markdown table of the rows so far (called after every row)."""
    write_json(out, payload)
    rows = payload["variants"]
    table = markdown_table(
        ["variant", "perplexity", "ppl / dense", "next-token agr.", "KL", "top-5", "MACs",
         "time s"],
        [[n, r["perplexity"], r.get("perplexity_ratio", 1.0), r["agreement"], r["kl_mean"],
          r["top5_overlap"], r.get("macs_ratio", 1.0), r["seconds"]]
         for n, r in rows.items() if "failed" not in r])
    out.with_suffix(".md").write_text(table + "\n")


def run_variant(model: torch.nn.Module, recipe: list[Any], data: dict[str, Any],
                task: LanguageModelTask) -> dict[str, Any]:
    started = time.perf_counter()
    res = npr.compress(model, recipe, calibration=data["calib"], train=data["train"],
                       example_inputs=data["x"], measure=False)
    seconds = time.perf_counter() - started
    m, _, _ = task.compare_models(model, res.model, data["held"])
    return {"perplexity": round(m["perplexity_compressed"], 3),
            "perplexity_ratio": round(m["perplexity_ratio"], 4),
            "agreement": round(m["agreement"], 4), "kl_mean": round(m["kl_mean"], 4),
            "top5_overlap": round(m["top5_overlap"], 4),
            "params": sum(t.numel() for t in res.model.parameters()),
            "macs_ratio": round(npr.measure.count_macs(res.model, data["x"])
                                / npr.measure.count_macs(model, data["x"]), 4),
            "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=str(CACHE))
    p.add_argument("--eval-windows", type=int, default=256)
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--train-windows", type=int, default=512)
    p.add_argument("--distill-steps", type=int, default=100)
    p.add_argument("--only", nargs="*", default=None, help="run only these variants")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "lm.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = ensure(Path(args.cache))
    meta = json.loads((cache / "meta.json").read_text())
    model = from_pretrained(cache / "model")
    tokens = torch.load(cache / "tokens.pt", weights_only=True)
    seq = int(meta["training"]["seq"])
    held = windows(tokens["held_out"], args.eval_windows, seq)
    calib = windows(tokens["train"], args.calib_windows, seq, seed=1)
    train = windows(tokens["train"], args.train_windows, seq, seed=2, batch=8)
    data = {"held": held, "calib": calib, "train": train, "x": calib[0][0]}
    task = LanguageModelTask()
    rows: dict[str, Any] = {}
    dense, _, _ = task.compare_models(model, model, held)
    rows["dense"] = {"perplexity": round(dense["perplexity_reference"], 3), "agreement": 1.0,
                     "kl_mean": 0.0, "top5_overlap": 1.0, "seconds": 0.0}
    print("dense", rows["dense"], flush=True)
    payload = {"model": meta, "eval_tokens": dense["tokens"], "cpu_flags": cpu_flags(),
               "threads": args.threads,
               "command": "python benchmarks/lm.py " + " ".join(argv or sys.argv[1:]),
               "variants": rows}
    out = Path(args.out)
    write(out, payload)
    for name, recipe in recipes(args).items():
        if args.only and name not in args.only:
            continue
        try:
            rows[name] = run_variant(model, recipe, data, task)
        except Exception as exc:  # one failing variant must not lose the others' figures
            rows[name] = {"failed": f"{type(exc).__name__}: {exc}"}
        print(name, rows[name], flush=True)
        write(out, payload)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
