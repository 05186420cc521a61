"""Distillation of the FisherPrune'd all-MiniLM-L6-v2: which training settings recover it.

Starts from a pruned model saved with ``torch.save`` (``--pruned``; e.g. FisherPrune 50% MACs
with the blocks refit on 512 calibration sentences) and runs ``Distill(loss="cosine")`` from
the unpruned model for each setting given (JSON objects of ``Distill`` fields plus
``checkpoints``: one run, constant lr, measured at each checkpoint; each chunk continues on the
train batches where the last one stopped; with ``"budgets": true`` each checkpoint is instead
its own run from the pruned model, its lr schedule (default cosine) spanning that budget, and
``"save": PATH`` keeps the largest budget's model; ``"data": "topics+docstrings"`` adds the
standard library's docstring sentences to the training text; ``"batch"``: sentences per step,
default 16; ``"bucket": true``: batches of sentences of similar length
(``train_batches(bucket=True)``); ``"freeze"``: a list, the ``Distill(freeze=...)`` patterns;
``"cache_teacher": true``: the reference's outputs on the training batches computed once
(``CachedTeacher``; not with ``features``); ``"data": "machine"``: every text that ships on
this machine as well (``_distill_text``); ``"relation_weight"``: the ``Distill`` batch
similarity-matrix term; ``"self_relation": {"weight": W, "layers": [5], "most_heads": 12}``
(budgets only, not with ``cache_teacher``): MiniLMv2's query/key/value relation KL of those
encoder layers added (``_self_relation``); ``"score_train": true``: also score 512 of the
sentences trained on (fitting the training text vs the teacher); ``"local_steps": N`` (budgets
only) spends the first N steps of each budget on block-local distillation,
``Distill(local=True, features=<the 6 encoder blocks>, loss="mse")`` at ``"local_lr"``
(default: lr), and the rest on the ordinary distillation: every optimizer step is counted in
the budget). Distillation sentences: Python's documentation topics minus the 512 held-out ones
(padded to the longest); evaluation on the last ``--eval`` held-out sentences (mean-pooled
embedding cosine to the original, retrieval agreement; PyTorch). ``--select N``: the N
documentation sentences just before those are held out of training too (a held-out slice of the
training text, on which settings are chosen) and every run is scored on them; ``--eval 0`` then
scores on them only.

    .venv/bin/python benchmarks/lm_minilm_distill.py --pruned pruned.pt \\
        --setting '{"lr": 5e-5, "dropout": true, "checkpoints": [60]}' \\
        --setting '{"lr": 5e-5, "dropout": false, "checkpoints": [60]}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from _cached_teacher import CachedTeacher
from _common import cpu_flags, markdown_table, write_json
from _self_relation import self_relation, strip
from _transformers_bench import batches, embed, train_batches
from lm_minilm_refit import score, setup

import netpress as npr

RESULTS = Path(__file__).parent / "results"
BLOCKS = ("re:encoder\\.layer\\.\\d+$",)


Scored = list[tuple[str, list[Any], torch.Tensor]]  # (prefix, batches, reference embeddings)


def scores(student: torch.nn.Module, sets: Scored) -> dict[str, float]:
    return {f"{p}{k}": v for p, data, ref in sets for k, v in score(student, ref, data).items()}


def budgets(kw: dict[str, Any], checkpoints: list[int], pruned: torch.nn.Module,
            model: torch.nn.Module, train: list[Any], sets: Scored,
            setting: str, save: str | None = None) -> list[dict[str, Any]]:
    """One run per budget, each from the pruned model with its own lr schedule; the
    student of the largest budget is saved to ``save`` (``torch.save``) when given."""
    x = {k: v[:1] for k, v in train[0][0].items()}
    kw.setdefault("lr_schedule", "cosine")
    local, local_lr = kw.pop("local_steps", 0), kw.pop("local_lr", kw.get("lr", 1e-3))
    rel = kw.pop("self_relation", None)
    rows = []
    for c in sorted(checkpoints, reverse=True):
        started = time.perf_counter()
        recipe = [npr.Distill(max_steps=c - local, optimizer="adamw", **kw)]
        if local:
            recipe.insert(0, npr.Distill(**{**kw, "max_steps": local, "optimizer": "adamw",
                                            "lr": local_lr, "local": True, "loss": "mse",
                                            "features": BLOCKS, "pooled_weight": 0.0}))
        with self_relation(pruned, model, **rel) if rel else nullcontext([]) as values:
            student = strip(npr.compress(pruned, recipe, reference=model, train=train,
                                         example_inputs=x, measure=False).model)
        if values:
            print(f"self-relation term: first 10 steps {sum(values[:10]) / 10:.4f}, last 10 "
                  f"{sum(values[-10:]) / 10:.4f}", flush=True)
        if c == max(checkpoints) and save:
            torch.save(student, save)
        seconds = time.perf_counter() - started
        rows.append({"setting": setting, "steps": c, "seconds": round(seconds),
                     "seconds_per_step": round(seconds / c, 2), **scores(student, sets)})
        print(rows[-1], flush=True)
    return rows


def seen(model: torch.nn.Module, train: list[Any], n: int = 512) -> Scored:
    """The first ``n`` training sentences (those of the first batches), re-batched by 32 with
    the reference's embeddings: what the student fits when it fits its training text."""
    out: list[Any] = []
    for x, _ in train:
        for i in range(0, x["input_ids"].shape[0], 32):
            if len(out) * 32 < n:
                out.append(({k: v[i:i + 32] for k, v in x.items()}, None))
    return [("train_", out, embed(model, out))]


def run(setting: dict[str, Any], pruned: torch.nn.Module, model: torch.nn.Module,
        tok: Any, texts: list[str], sets: Scored, held_out: int) -> list[dict[str, Any]]:
    kw = dict(setting)
    checkpoints = sorted(kw.pop("checkpoints"))
    size = kw.pop("batch", 16)
    train = train_batches(tok, texts, kw.pop("data", "topics"), size, held_out=held_out,
                          bucket=kw.pop("bucket", False), count=max(checkpoints) * size)
    if kw.pop("score_train", False):
        sets = sets + seen(model, train)
    if "freeze" in kw:
        kw["freeze"] = tuple(kw["freeze"])
    kw.setdefault("loss", "cosine")
    if kw.pop("cache_teacher", False):
        started = time.perf_counter()
        model = CachedTeacher(model, train)
        print(f"teacher outputs cached in {time.perf_counter() - started:.0f} s", flush=True)
    if kw.pop("budgets", False):
        return budgets(kw, checkpoints, pruned, model, train, sets,
                       json.dumps(setting), kw.pop("save", None))
    x = {k: v[:1] for k, v in train[0][0].items()}
    student, done, started, rows = pruned, 0, time.perf_counter(), []
    for c in checkpoints:
        k = done % len(train)
        step = npr.Distill(max_steps=c - done, optimizer="adamw", lr_schedule="constant", **kw)
        student = npr.compress(student, [step], reference=model, train=train[k:] + train[:k],
                               example_inputs=x, measure=False).model
        done = c
        rows.append({"setting": json.dumps(setting), "steps": c,
                     "seconds": round(time.perf_counter() - started),
                     **scores(student, sets)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pruned", required=True, help="a pruned model saved with torch.save")
    p.add_argument("--setting", action="append", required=True)
    p.add_argument("--eval", type=int, default=256)
    p.add_argument("--select", type=int, default=0,
                   help="held-out slice of the training text (sentences), scored as select_")
    p.add_argument("--out", default=str(RESULTS / "lm_minilm_distill.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    tok, model, texts, evaluate, ref = setup(max(args.eval, 1))
    sets: Scored = [("", evaluate, ref)] if args.eval else []
    if args.select:
        part = batches(tok, texts[-512 - args.select:-512], 32)
        sets.append(("select_", part, embed(model, part)))
    pruned = torch.load(args.pruned, weights_only=False)
    rows = [{"setting": "none", "steps": 0, "seconds": 0, **scores(pruned, sets)}]
    for s in args.setting:
        rows += run(json.loads(s), pruned, model, tok, texts, sets, 512 + args.select)
    write_json(Path(args.out), {"command": "python benchmarks/lm_minilm_distill.py "
                                + " ".join(sys.argv[1:]), "cpu_flags": cpu_flags(),
                                "eval_sentences": args.eval, "select_sentences": args.select,
                                "topics_train_sentences": len(texts) - 512 - args.select,
                                "rows": rows})
    prefixes = [p for p, _, _ in sets] + ["train_"]
    cols = [p for p in prefixes if any(f"{p}cosine_mean" in r for r in rows)]
    table = markdown_table(
        ["setting", "steps"] + [f"{p or 'eval_'}cosine mean / min, retrieval" for p in cols]
        + ["s"],
        [[r["setting"], r["steps"]] + [
            f"{r[p + 'cosine_mean']} / {r[p + 'cosine_min']}, {r[p + 'retrieval_agreement']}"
            if f"{p}cosine_mean" in r else "-" for p in cols] + [r["seconds"]] for r in rows])
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
