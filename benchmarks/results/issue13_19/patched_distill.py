"""Ad hoc screen: benchmarks/lm_minilm_distill.py with training levers patched in.

PATCH env var (JSON): {"steps": 500, "feat_hold": 0.5 (feature weight 1 until that share of
the steps, then linear to 0), "schedule": "linear" (warm-up then linear to 0),
"beta2": 0.98}
"""
import json
import os
import sys

sys.path.insert(0, "benchmarks")
import netpress.recover.loop as loop
import netpress.recover.methods as methods

P = json.loads(os.environ.get("PATCH", "{}"))
print("PATCH", P, flush=True)
if "feat_hold" in P:
    calls = {"n": 0}
    orig = methods.feature_loss
    total, hold = P["steps"], P["feat_hold"]

    def annealed(pairs):
        s = calls["n"]
        calls["n"] += 1
        f = s / total
        w = 1.0 if f < hold else max(0.0, (1 - f) / (1 - hold))
        return orig(pairs) * w
    methods.feature_loss = annealed
if P.get("schedule") == "linear":
    def lam(cfg, total):
        def f(step):
            if cfg.warmup_steps and step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            span = max(1, total - cfg.warmup_steps)
            return max(0.0, 1.0 - (step - cfg.warmup_steps) / span)
        return f
    loop._lr_lambda = lam
if "beta2" in P:
    orig_opt = loop._optimizer
    def opt(model, cfg):
        o = orig_opt(model, cfg)
        for g in o.param_groups:
            g["betas"] = (0.9, P["beta2"])
        return o
    loop._optimizer = opt
import lm_minilm_distill  # noqa: E402  (after the patches)

lm_minilm_distill.main()
