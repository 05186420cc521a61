"""Ad hoc (issue 13, twelfth part): refit only the last block of a distilled student towards
the original, by ridge least squares on calibration sentences, and score it.

    .venv/bin/python benchmarks/results/lm_minilm_13q_lastrefit.py STUDENT.pt

Output of the run recorded in BENCHMARKS.md: ``lm_minilm_13q_lastrefit.txt`` beside this file
(the run was stopped after its first two variants; they answered the question).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _transformers_bench import batches, embed
from lm_minilm_refit import score, setup

from netpress.prune.refit import refit_blocks

LAST = "encoder.layer.5."
VARIANTS: dict[str, list[str] | None] = {
    "ffn_out": [LAST + "output.dense"],
    "ffn_out+ln": [LAST + "output.dense", LAST + "output.LayerNorm"],
    "block5": None,  # every Linear and LayerNorm of the last block
}


def main() -> None:
    torch.manual_seed(0)
    tok, model, texts, evaluate, ref = setup(512)
    sel = batches(tok, texts[-512 - 256:-512], 32)
    sref = embed(model, sel)
    student = torch.load(sys.argv[1], weights_only=False).eval()
    print("before", score(student, ref, evaluate), "select", score(student, sref, sel),
          flush=True)
    for ncal in (1350,):  # every documentation sentence before the selection slice
        calib = [x for x, _ in batches(tok, texts[:ncal], 32, pad="longest")]
        for name, only in VARIANTS.items():
            for damp in (0.01, 0.1):
                s = copy.deepcopy(student)
                started = time.perf_counter()
                names = set(only) if only else {
                    n for n, m in s.named_modules()
                    if n.startswith(LAST) and isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))}
                done = refit_blocks(s, model, calib, damp=damp, only=names, norms=True)
                print(ncal, name, damp, len(done), "eval", score(s, ref, evaluate), "select",
                      score(s, sref, sel), f"{time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
