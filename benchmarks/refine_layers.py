"""Layer-level check of SparseGPT's mask refinement on the real all-MiniLM-L6-v2.

For a few Linear layers, each layer's input Hessian is taken from the original model on 512
calibration sentences and, separately, on 512 held-out ones (the evaluation block of
``oneshot.py minilm``). Each layer is pruned to 50% by SparseGPT alone, SparseGPT with the
least-squares refit of its kept weights, and SparseGPT + ALPS-style ADMM mask refinement +
the refit (``SparseGPT(mask_refine="admm")``'s maths); the table gives each one's relative
output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` on the calibration and on the held-out inputs.
No training; plain mode (the original model's inputs), so the layers are comparable.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/refine_layers.py

writes ``benchmarks/results/refine_layers.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import write_json
from _minilm_text import layer_problems, load_minilm, sentences

from netpress.reconstruct.lstsq import masked_lstsq
from netpress.reconstruct.refine import admm_prune, masked_error
from netpress.reconstruct.sparsegpt import sparsegpt

RESULTS = Path(__file__).parent / "results"
LAYERS = ["encoder.encoder.layer.0.attention.output.dense",
          "encoder.encoder.layer.5.attention.output.dense",
          "encoder.encoder.layer.2.attention.self.query",
          "encoder.encoder.layer.5.intermediate.dense",
          "encoder.encoder.layer.5.output.dense"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--damp", type=float, default=0.1)
    p.add_argument("--sparsity", type=float, default=0.5)
    args = p.parse_args()
    torch.set_num_threads(1)
    tok, ref = load_minilm()
    text = sentences(1024)  # calibration block first, then the evaluation block
    rows = []
    for name, w, h, held in layer_problems(tok, ref, LAYERS, text[:512], text[512:]):
        t0 = time.perf_counter()
        pruned, keep = sparsegpt(w, h, sparsity=args.sparsity, damp=args.damp)
        refit = masked_lstsq(w, h, keep, args.damp)
        t1 = time.perf_counter()
        mask = admm_prune(w, h, pruned, keep=int(keep.sum()), damp=args.damp)
        admm = masked_lstsq(w, h, mask, args.damp)
        t2 = time.perf_counter()
        row = {"layer": name.removeprefix("encoder.encoder."), "shape": list(w.shape),
               "mask_changed": round(float((mask != keep).float().mean()), 4),
               "seconds_sparsegpt_refit": round(t1 - t0, 1), "seconds_admm": round(t2 - t1, 1)}
        for tag, hess in (("cal", h), ("held", held)):
            base = masked_error(torch.zeros_like(w), w, hess)
            for method, wh in (("sparsegpt", pruned), ("refit", refit), ("admm", admm)):
                row[f"{tag}_{method}"] = masked_error(wh, w, hess) / base
        print(row, flush=True)
        rows.append(row)
    write_json(RESULTS / "refine_layers.json", {"args": vars(args), "rows": rows})
    lines = ["| layer | SparseGPT cal / held | + refit cal / held | + ADMM + refit cal / held "
             "| held: ADMM vs refit | mask changed | s (SparseGPT+refit / ADMM+refit) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['cal_sparsegpt']:.4f} / {r['held_sparsegpt']:.4f} | "
            f"{r['cal_refit']:.4f} / {r['held_refit']:.4f} | {r['cal_admm']:.4f} / "
            f"{r['held_admm']:.4f} | {100 * (r['held_admm'] / r['held_refit'] - 1):+.1f}% | "
            f"{100 * r['mask_changed']:.1f}% | {r['seconds_sparsegpt_refit']} / "
            f"{r['seconds_admm']} |")
    (RESULTS / "refine_layers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
