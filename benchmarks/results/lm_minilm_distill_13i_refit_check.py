"""Does a refit towards the original undo distillation? The staged 500-step model (50% MACs),
its residual-writing Linear layers (attention.output.dense, output.dense) and block
LayerNorms refitted towards the unpruned original on the 512 calibration sentences (the
refit FisherPrune does after a cut; these layers need no kept-row map), scored on the
256-sentence selection slice before and after. Ad hoc, ninth part of issue 13."""
import copy
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from _transformers_bench import batches, embed
from lm_minilm_refit import score, setup

from netpress.prune.refit import refit_blocks

torch.manual_seed(0)
tok, model, texts, _, _ = setup(1)
part = batches(tok, texts[-512 - 256:-512], 32)
ref = embed(model, part)
calib = [x for x, _ in batches(tok, texts[:512], 32, pad="longest")]
student = torch.load("/tmp/ha/staged3_original.pt", weights_only=False).eval()
print("distilled (staged, 500 steps):", score(student, ref, part), flush=True)
only = {f"encoder.layer.{i}.{n}" for i in range(6) for n in (
    "attention.output.dense", "output.dense", "attention.output.LayerNorm", "output.LayerNorm")}
started = time.perf_counter()
refitted = copy.deepcopy(student)
done = refit_blocks(refitted, model, calib, only=only, norms=True)
print(f"refitted {len(done)} layers in {time.perf_counter() - started:.0f} s", flush=True)
print("after the refit towards the original:", score(refitted, ref, part), flush=True)
