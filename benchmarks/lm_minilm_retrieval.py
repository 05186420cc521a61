"""How retrieval agreement relates to the embedding cosine on the held-out sentences.

all-MiniLM-L6-v2 (real weights), the last ``--eval`` held-out sentences of Python's
documentation topics, sequence length 128, PyTorch. Reports the reference's nearest-neighbour
margins (``netpress.measure.text.neighbour_margin``: how close each sentence's second
neighbour is to its first), retrieval agreement under isotropic random perturbations of the
normalised embeddings at several mean cosines (the best case for a given cosine), and for
each model given (``--model NAME=PATH``, saved with ``torch.save``): its cosine, its retrieval
agreement, the isotropic case's retrieval at the same cosine, and how concentrated its error
is (share of the error energy in the mean error direction and in the top 8 principal
directions; isotropic noise puts ~1/384 and ~8/384 there).

    .venv/bin/python benchmarks/lm_minilm_retrieval.py --model pruned=pruned.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import cpu_flags, markdown_table, write_json
from _transformers_bench import embed
from lm_minilm_refit import setup

from netpress.measure.text import neighbour_margin, retrieval_agreement

RESULTS = Path(__file__).parent / "results"


def isotropic(ref: torch.Tensor, eps: float, seed: int = 0) -> torch.Tensor:
    """The normalised ``ref`` plus ``eps`` times random unit vectors, renormalised."""
    e = F.normalize(ref.double(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    noise = F.normalize(torch.randn(e.shape, generator=g, dtype=torch.float64), dim=-1)
    return F.normalize(e + eps * noise, dim=-1)


def isotropic_at(ref: torch.Tensor, cosine: float) -> float:
    """Retrieval agreement of isotropic noise tuned (bisection on its size) to ``cosine``."""
    e = F.normalize(ref.double(), dim=-1)
    lo, hi = 0.0, 4.0
    for _ in range(30):
        mid = (lo + hi) / 2
        c = float((isotropic(ref, mid) * e).sum(-1).mean())
        lo, hi = (mid, hi) if c > cosine else (lo, mid)
    return retrieval_agreement(ref, isotropic(ref, (lo + hi) / 2))


def concentration(ref: torch.Tensor, emb: torch.Tensor) -> dict[str, float]:
    """Share of the error energy (normalised embeddings) in the mean error direction and in
    the top 8 principal directions of the errors."""
    err = F.normalize(emb.double(), dim=-1) - F.normalize(ref.double(), dim=-1)
    total = float((err ** 2).sum())
    mean = err.mean(0)
    top8 = torch.linalg.svdvals(err)[:8]
    return {"mean_direction_share": round(err.shape[0] * float(mean @ mean) / total, 4),
            "top8_share": round(float((top8 ** 2).sum()) / total, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", type=int, default=512)
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--out", default=str(RESULTS / "lm_minilm_retrieval.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    _tok, _model, _texts, evaluate, ref = setup(args.eval)
    gaps = neighbour_margin(ref)
    margins = {f"share_below_{g}": round(float((gaps < g).double().mean()), 4)
               for g in (0.005, 0.01, 0.02, 0.05)}
    margins["median"] = round(float(gaps.median()), 4)
    e = F.normalize(ref.double(), dim=-1)
    noise = []
    for eps in (0.05, 0.1, 0.15, 0.2, 0.3, 0.45):
        q = isotropic(ref, eps)
        noise.append({"eps": eps, "cosine_mean": round(float((q * e).sum(-1).mean()), 4),
                      "retrieval_agreement": round(retrieval_agreement(ref, q), 4)})
    rows: list[dict[str, Any]] = []
    for spec in args.model:
        name, path = spec.split("=", 1)
        emb = embed(torch.load(path, weights_only=False).eval(), evaluate)
        cos = F.cosine_similarity(ref.double(), emb.double(), dim=-1)
        rows.append({"model": name, "cosine_mean": round(float(cos.mean()), 4),
                     "cosine_min": round(float(cos.min()), 4),
                     "retrieval_agreement": round(retrieval_agreement(ref, emb), 4),
                     "isotropic_retrieval_same_cosine": round(isotropic_at(ref,
                                                                           float(cos.mean())), 4),
                     **concentration(ref, emb)})
        print(rows[-1], flush=True)
    write_json(Path(args.out), {"command": "python benchmarks/lm_minilm_retrieval.py "
                                + " ".join(sys.argv[1:]), "cpu_flags": cpu_flags(),
                                "eval_sentences": args.eval, "reference_margins": margins,
                                "isotropic_noise": noise, "models": rows})
    table = markdown_table(
        ["model", "cosine mean / min", "retrieval agr.", "isotropic noise, same cosine",
         "error in mean direction", "error in top 8 directions"],
        [[r["model"], f"{r['cosine_mean']} / {r['cosine_min']}", r["retrieval_agreement"],
          r["isotropic_retrieval_same_cosine"], r["mean_direction_share"], r["top8_share"]]
         for r in rows])
    noise_table = markdown_table(["isotropic noise: cosine mean", "retrieval agr."],
                                 [[n["cosine_mean"], n["retrieval_agreement"]] for n in noise])
    text = f"reference margins: {margins}\n\n{noise_table}\n\n{table}\n"
    Path(args.out).with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
