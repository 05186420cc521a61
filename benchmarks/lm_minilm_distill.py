"""Distillation of the FisherPrune'd all-MiniLM-L6-v2: which training settings recover it.

Starts from a pruned model saved with ``torch.save`` (``--pruned``; e.g. FisherPrune 50% MACs with
the blocks refit on 512 calibration sentences) and runs ``Distill(loss="cosine")`` from the
unpruned model for each setting given (JSON objects of ``Distill`` fields plus ``checkpoints``: one
run, constant lr, measured at each checkpoint; each chunk continues on the train batches where the
last one stopped; with ``"budgets": true`` each checkpoint is instead its own run from the pruned
model, its lr schedule (default cosine) spanning that budget, and ``"save": PATH`` keeps the
largest budget's model; ``"data": "topics+docstrings"`` adds the standard library's docstring
sentences to the training text; ``"batch"``: sentences per step, default 16; ``"bucket": true``:
batches of sentences of similar length (``train_batches(bucket=True)``); ``"freeze"``: a list, the
``Distill(freeze=...)`` patterns; ``"cache_teacher": true``: the reference's outputs on the
training batches computed once (``CachedTeacher``; not with ``features``); ``"data": "machine"``:
every text that ships on this machine as well (``_distill_text``); ``"augment": {"share": 0.5,
"kinds": [...]}``: the training sentences repeated to the budget, repeats varied word by word
(``_text_augment``); ``"relation_weight"``: the ``Distill`` batch similarity-matrix term;
``"self_relation": {"weight": W, "layers": [5], "most_heads": 12}`` (budgets only, not with
``cache_teacher``): MiniLMv2's query/key/value relation KL of those encoder layers added
(``_self_relation``); ``"score_train": true``: also score 512 of the sentences trained on (fitting
the training text vs the teacher); ``"local_steps": N`` (budgets only) spends the first N steps of
each budget on block-local distillation, ``Distill(local=True, features=<the 6 encoder blocks>,
loss="mse")`` at ``"local_lr"`` (default: lr), and the rest on the ordinary distillation: every
optimizer step is counted in the budget); ``"stages": [[MACS, STEPS], ...]`` (with ``"budgets":
true``) starts from the unpruned model instead of ``--pruned`` and alternates
``FisherPrune(macs=MACS)`` (MACs a fraction of the unpruned model's; Fisher scores on the current
student, ``"calib"`` calibration sentences, default 512) with ``STEPS`` distillation steps (own
warm-up and cosine schedule per stage, each stage continuing on the training batches where the last
stopped; the steps of all stages are the budget), ``"refit_to": "current"`` refitting each cut
towards the student before it (what ``FisherPrune`` does in ``npr.compress``) or ``"original"``
towards the unpruned model (its kept output rows composed over the stages), every stage scored).
Distillation sentences: Python's documentation topics minus the 512 held-out ones (padded to the
longest); evaluation on the last ``--eval`` held-out sentences (mean-pooled embedding cosine to the
original, retrieval agreement; PyTorch). ``--select N``: the N documentation sentences just before
those are held out of training too (a held-out slice of the training text, on which settings are
chosen) and every run is scored on them; ``--eval 0`` then scores on them only.

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
from netpress.measure.macs import count_macs
from netpress.prune import posttraining
from netpress.prune.refit import refit_blocks

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


def compose_rows(before: dict[str, torch.Tensor],
                 cut: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kept output rows relative to the unpruned model after one more cut: ``before`` maps a
    layer to its rows of the unpruned layer, ``cut`` to the rows this cut kept of it now."""
    return {**before, **{n: before[n][r] if n in before else r for n, r in cut.items()}}


def staged(kw: dict[str, Any], stages: list[list[float]], original: torch.nn.Module,
           teacher: torch.nn.Module, train: list[Any], calib: list[Any], sets: Scored,
           setting: str, refit_to: str, save: str | None = None) -> list[dict[str, Any]]:
    """FisherPrune and distillation in turn from the unpruned ``original`` (see the module
    docs, ``"stages"``); a row after every cut and every distillation."""
    if refit_to not in ("current", "original"):
        raise ValueError(f"refit_to={refit_to!r}: choose 'current' or 'original'")
    x = {k: v[:1] for k, v in calib[0].items()}
    base = count_macs(original, x)
    kw.setdefault("lr_schedule", "cosine")
    student, rows_kept, done, rows = original, {}, 0, []
    started = time.perf_counter()
    for macs, steps in stages:
        cfg = npr.FisherPrune(macs=float(macs), calibration_batches=len(calib))
        if refit_to == "current":
            student, _ = posttraining.fisher_prune(student, cfg, x, calib, reference_macs=base)
        else:
            cut = posttraining.fisher_cut(student, cfg, x, calib, reference_macs=base)
            rows_kept = compose_rows(rows_kept, cut.kept_rows)
            refit_blocks(cut.model, original, calib, kept_rows=rows_kept, damp=cfg.damp,
                         norms=cfg.refit_norms)
            student = cut.model
        ratio = round(count_macs(student, x) / base, 4)
        rows.append({"setting": setting, "stage": f"FisherPrune(macs={macs})", "steps": done,
                     "macs_ratio": ratio, "seconds": round(time.perf_counter() - started),
                     **scores(student, sets)})
        print(rows[-1], flush=True)
        if steps:
            k = done % len(train)
            step = npr.Distill(max_steps=int(steps), optimizer="adamw", **kw)
            student = npr.compress(student, [step], reference=teacher,
                                   train=train[k:] + train[:k], example_inputs=x,
                                   measure=False).model
            done += int(steps)
            rows.append({"setting": setting, "stage": f"Distill({int(steps)})", "steps": done,
                         "macs_ratio": ratio, "seconds": round(time.perf_counter() - started),
                         **scores(student, sets)})
            print(rows[-1], flush=True)
    if save:
        torch.save(student, save)
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


def run(setting: dict[str, Any], pruned: torch.nn.Module | None, model: torch.nn.Module,
        tok: Any, texts: list[str], sets: Scored, held_out: int) -> list[dict[str, Any]]:
    kw = dict(setting)
    checkpoints = sorted(kw.pop("checkpoints", [sum(int(n) for _, n in kw.get("stages", []))]))
    size = kw.pop("batch", 16)
    train = train_batches(tok, texts, kw.pop("data", "topics"), size, held_out=held_out,
                          bucket=kw.pop("bucket", False), count=max(checkpoints) * size,
                          augment=kw.pop("augment", None))
    if kw.pop("score_train", False):
        sets = sets + seen(model, train)
    if "freeze" in kw:
        kw["freeze"] = tuple(kw["freeze"])
    kw.setdefault("loss", "cosine")
    original = model
    if kw.pop("cache_teacher", False):
        started = time.perf_counter()
        model = CachedTeacher(model, train)
        print(f"teacher outputs cached in {time.perf_counter() - started:.0f} s", flush=True)
    if "stages" in kw:
        calib = [x for x, _ in batches(tok, texts[:kw.pop("calib", 512)], 32, pad="longest")]
        kw.pop("budgets", None)
        return staged(kw, kw.pop("stages"), original, model, train, calib, sets,
                      json.dumps(setting), kw.pop("refit_to", "current"), kw.pop("save", None))
    if pruned is None:
        raise SystemExit(f"setting {json.dumps(setting)}: --pruned is needed without stages")
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
    p.add_argument("--pruned", default=None,
                   help="a pruned model saved with torch.save (settings without stages)")
    p.add_argument("--setting", action="append", default=[],
                   help="none: only score the --pruned model")
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
    pruned = torch.load(args.pruned, weights_only=False) if args.pruned else None
    rows = [{"setting": "none", "steps": 0, "seconds": 0, **scores(pruned, sets)}] \
        if pruned is not None else []
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
        [[r["setting"] + (f" {r['stage']}" if "stage" in r else ""), r["steps"]] + [
            f"{r[p + 'cosine_mean']} / {r[p + 'cosine_min']}, {r[p + 'retrieval_agreement']}"
            if f"{p}cosine_mean" in r else "-" for p in cols] + [r["seconds"]] for r in rows])
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
