"""Ad hoc: refit only the last block(s) of a distilled student towards the original."""
import copy, sys, json, time
sys.path.insert(0, "/work/main/benchmarks")
import torch
from _transformers_bench import batches
from lm_minilm_refit import score, setup
from netpress.prune.refit import refit_blocks

torch.manual_seed(0)
path = sys.argv[1]
tok, model, texts, evaluate, ref = setup(512)
sel = batches(tok, texts[-512 - 256:-512], 32)
from _transformers_bench import embed
sref = embed(model, sel)
student = torch.load(path, weights_only=False).eval()
print("before", score(student, ref, evaluate), "select", score(student, sref, sel), flush=True)
L = "encoder.layer.5."
variants = {
    "ffn_out": [L + "output.dense"],
    "ffn_out+ln": [L + "output.dense", L + "output.LayerNorm"],
    "block5": None,
}
for ncal in (1350,):
    calib = [x for x, _ in batches(tok, texts[:ncal], 32, pad="longest")]
    for name, only in variants.items():
        for damp in (0.01, 0.1):
            s = copy.deepcopy(student)
            t = time.perf_counter()
            o = set(only) if only else {n for n, m in s.named_modules() if n.startswith(L) and isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))}
            done = refit_blocks(s, model, calib, damp=damp, only=o, norms=True)
            print(ncal, name, damp, len(done), "eval", score(s, ref, evaluate), "select",
                  score(s, sref, sel), f"{time.perf_counter()-t:.0f}s", flush=True)
