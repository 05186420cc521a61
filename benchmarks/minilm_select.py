"""Choose SparseGPT 50% settings for all-MiniLM-L6-v2 on a held-out split of the calibration
corpus, then report them on the evaluation sentences (issue 11, fourth follow-up).

The sentence pool and the evaluation block are those of ``oneshot.py minilm`` (512 pydoc
sentences for evaluation, always the same). From the calibration sentences, ``--holdout``
of them (taken at an even stride, so pydoc and docstring text alike) are set aside and
never calibrated on: each row's embedding cosine on them is the figure settings are chosen
by. ``--holdout 0`` calibrates on exactly what ``oneshot.py minilm --calibration N`` does.
The cosine on the evaluation sentences is written too, never used to choose.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/minilm_select.py --calibration 1500 \\
        --holdout 512 --rows "base,depth 0.05" --tag proxy

writes ``benchmarks/results/minilm_select_<tag>.{json,md}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from _common import Timer, cpu_flags, markdown_table, write_json
from _minilm_text import (
    MINILM_GROUPS,
    POOLER,
    ROLES_A,
    _embed,
    by_length,
    load_minilm,
    minilm_batches,
    sentences,
)

import netpress as npr
from netpress.reconstruct.allocation import depth_tilt
from netpress.select import matches

RESULTS = Path(__file__).parent / "results"
BLOCKS = 6


def split(count: int, holdout: int, evals: int = 512) -> tuple[list[str], list[str], list[str]]:
    """``(calibration, holdout, evaluation)`` sentences: the evaluation block as in
    ``oneshot.py minilm``; the holdout every k-th of the rest, at an even stride."""
    text = sentences(count + holdout + evals)
    first = min(count + holdout, 512)
    rest = text[:first] + text[first + evals:]
    held: set[int] = set()
    if holdout:
        step = len(rest) / holdout
        held = {int(step * i + step / 2) for i in range(holdout)}
    return ([s for i, s in enumerate(rest) if i not in held],
            [s for i, s in enumerate(rest) if i in held], text[first:first + evals])


def depth_roles(sizes: dict[str, int], tilt: float) -> dict[str, float]:
    """Roles A with a depth tilt (:func:`netpress.reconstruct.allocation.depth_tilt`) over
    the Linear layers ``sizes`` (name: weights): block ``b``'s layers get
    ``tilt * (2.5 - b) / 2.5`` more sparsity (early blocks more, late blocks less); the FFN
    output takes what roles A leave (58.75% without the pooler). The total stays 50%."""
    role = dict(ROLES_A)
    role[MINILM_GROUPS["ffn-out"]] = 0.5875
    names = list(sizes)
    base = [next(v for k, v in role.items() if matches(k, n)) for n in names]
    depths = [int(n.split(".layer.")[1].split(".")[0]) for n in names]
    return dict(zip(names, depth_tilt(base, [sizes[n] for n in names], depths, tilt)))


def rows(sizes: dict[str, int]) -> dict[str, list[Any]]:
    sgpt = npr.SparseGPT
    admm: dict[str, Any] = {"sparsity": 0.5, "damp": 0.1, "mask_refine": "admm",
                            "ignore": (POOLER,)}
    out: dict[str, list[Any]] = {
        "base": [sgpt(per_layer=ROLES_A, **admm)],
        "refit_bias": [sgpt(per_layer=ROLES_A, refit_bias=True, **admm)],
    }
    for tilt in (0.03, 0.05, 0.1, -0.05):
        out[f"depth {tilt}"] = [sgpt(per_layer=depth_roles(sizes, tilt), **admm)]
    for damp in (0.03, 0.05, 0.2):
        out[f"damp {damp}"] = [sgpt(per_layer=ROLES_A, **{**admm, "damp": damp})]
    for tilt in (0.05, 0.1):  # the two levers together
        for damp in (0.01, 0.03, 0.05):
            out[f"depth {tilt} damp {damp}"] = [
                sgpt(per_layer=depth_roles(sizes, tilt), **{**admm, "damp": damp})]
    return out


def cosines(ref_emb: torch.Tensor, model: torch.nn.Module, batches: list[Any]) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(ref_emb.double(),
                                                 _embed(model, batches).double(), dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration", type=int, default=1500)
    p.add_argument("--holdout", type=int, default=512)
    p.add_argument("--rows", default="base")
    p.add_argument("--tag", default="proxy")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok, ref = load_minilm()
    calib_lines, held_lines, eval_lines = split(args.calibration, args.holdout)
    calib = minilm_batches(tok, calib_lines)
    sets = {"eval": minilm_batches(tok, eval_lines)}
    if held_lines:
        sets["holdout"] = minilm_batches(tok, held_lines)
    base = {k: _embed(ref, b) for k, b in sets.items()}
    table = rows({n: m.weight.numel() for n, m in ref.named_modules()
                  if isinstance(m, torch.nn.Linear) and ".layer." in n})
    unknown = [r for r in args.rows.split(",") if r not in table]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(table)}")
    results = []
    for label in args.rows.split(","):
        with Timer() as t:
            res = npr.compress(ref, table[label], calibration=calib, measure=False)
        step = res.report["steps"][-1]
        row: dict[str, Any] = {"row": label, "seconds": round(t.seconds, 1),
                               "sparsity": step.get("sparsity"),
                               "peak_rss_mb": step.get("peak_rss_mb")}
        for k, b in sets.items():
            cos = cosines(base[k], res.model, b)
            row[f"{k}_mean"], row[f"{k}_min"] = float(cos.mean()), float(cos.min())
            if k == "eval":
                order = by_length(tok, eval_lines)
                row["worst"] = [(round(float(cos[i]), 4), order[i])
                                for i in torch.argsort(cos)[:3].tolist()]
        print({k: v for k, v in row.items() if k != "worst"}, flush=True)
        results.append(row)
        cols = ["row", "holdout_mean", "holdout_min", "eval_mean", "eval_min", "sparsity",
                "seconds", "peak_rss_mb"]
        md = markdown_table(cols, [[f"{100 * r[c]:.2f}%" if c.endswith(("_mean", "_min"))
                                    and c in r else r.get(c, "") for c in cols]
                                   for r in results])
        write_json(RESULTS / f"minilm_select_{args.tag}.json",
                   {"args": vars(args), "cpu_flags": cpu_flags(), "calibration_sentences":
                    len(calib_lines), "holdout_sentences": len(held_lines), "results": results})
        (RESULTS / f"minilm_select_{args.tag}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
