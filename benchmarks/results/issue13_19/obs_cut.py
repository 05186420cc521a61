"""Ad hoc: FisherPrune's 50% MACs cut of all-MiniLM-L6-v2 with the units *within* each group
chosen by greedy group OBS on its reader (counts per group from the Fisher selection).
usage: obs_cut.py CALIB MODE SAVE   (MODE: fisher | obs | blend)"""
import sys
import time

sys.path.insert(0, "benchmarks")
import numpy as np
import torch
from _transformers_bench import batches
from lm_minilm_refit import score, setup

import netpress as npr
from netpress.prune import posttraining
from netpress.reconstruct.engine import collect_statistics
from netpress.reconstruct.layers import LayerView
from netpress.reconstruct.obs import damped, greedy_unit_order

calib_n, mode, save = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.manual_seed(0)
tok, model, texts, evaluate, ref = setup(512)
calib = [x for x, _ in batches(tok, texts[:calib_n], 32, pad="longest")]
x = {k: v[:1] for k, v in calib[0].items()}
stash = {}
fisher = posttraining._fisher
def f(work, groups, data, *a, **k):
    stash["work"], stash["data"] = work, data
    return fisher(work, groups, data, *a, **k)
posttraining._fisher = f
orders = {}
def obs_orders(groups):
    work = stash["work"]
    names = sorted({g.reader for g in groups})
    t = time.time()
    stats = collect_statistics(work, None, names, [(d, None) for d in stash["data"]],
                               mode="sequential-local")
    for g in groups:
        if g.index in orders:
            continue
        h = stats[g.reader].hessian[0]
        w = LayerView(work.get_submodule(g.reader), g.reader).matrix()[0]
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(damped(h, 0.01)))
        cols = [torch.from_numpy(np.asarray(c, dtype=np.int64)) for c in g.columns]
        order, added = greedy_unit_order([(w.double(), hinv.double(), cols)])
        orders[g.index] = order
    print(f"OBS orders {time.time() - t:.0f} s", flush=True)
sel = posttraining._select
def select(graph, groups, scores, cfg, goal, now, base, whole):
    parts, floor = sel(graph, groups, scores, cfg, goal, now, base, whole)
    if mode == "fisher":
        return parts, floor
    obs_orders(groups)
    out = []
    for g, p in zip(groups, parts):
        k = int(p.sum())
        q = np.zeros(len(p), dtype=bool)
        if mode == "obs":
            q[orders[g.index][:k]] = True
        else:  # blend: rank by the mean of the two ranks
            fr = np.argsort(np.argsort(scores[g.index].numpy()))
            orank = np.empty(len(p))
            orank[orders[g.index]] = np.arange(len(p))
            q[np.argsort(fr + orank)[:k]] = True
        same = int((q & p).sum())
        print(f"group {g.reader}: remove {k} of {len(p)}, {same} the same as Fisher", flush=True)
        out.append(q)
    return out, floor
posttraining._select = select
cfg = npr.FisherPrune(macs=0.5, calibration_batches=len(calib))
t = time.time()
pruned, summary = posttraining.fisher_prune(model, cfg, x, calib)
print(mode, calib_n, f"{time.time() - t:.0f} s", summary["macs_after"] / summary["macs_before"],
      score(pruned, ref, evaluate), flush=True)
torch.save(pruned, save)
