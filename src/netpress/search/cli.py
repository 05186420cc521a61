"""``netpress search``: the command-line face of :func:`netpress.search.search`.

Wire it into ``netpress.cli`` with ``add_parser(subparsers)`` and dispatch to ``run(args)``.
``--model``, ``--weights`` and ``--data`` take the same forms as ``netpress compress``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from netpress.errors import DataError, RecipeError

__all__ = ["add_parser", "run", "EXAMPLE"]

EXAMPLE = ("netpress search --model cifar_resnet20 --weights resnet20.th "
           "--data cifar10:../shared/data --objective size --constraint 'agreement>=0.99' "
           "--trials 10 --out search-out")


def _epilog() -> str:
    import textwrap

    from netpress._cli_specs import DATA_FORM

    paragraphs = (
        "CONSTRAINT: agreement>=X, accuracy_drop<=X, class_agreement>=X; for text: "
        "cosine>=X (sentence-embedding: mean cosine of the embeddings), perplexity_ratio<=X "
        "(language-model: compressed / reference perplexity); agreement is next-token "
        "agreement (language-model) or retrieval agreement (sentence-embedding)",
        "SPACE: per-layer, grouped (by top-level block), global, or a recipe file with "
        "{range: [lo, hi]} / {choice: [...]} values",
        "MODEL: a built-in name (see `netpress models`), a .npress file, hf:DIR (a local "
        "transformers directory), or "
        "package.module:factory (imported from the current directory first)",
        "DATA: digits, cifar10:DIR, mnist:DIR, fashion-mnist:DIR, text:FILE (one text a "
        "line, tokenized with --tokenizer or the --model hf:DIR tokenizer; 20% held out to "
        "score the trials), or package.module:factory "
        f"returning {DATA_FORM}")
    body = "\n".join(textwrap.fill(p, width=79, subsequent_indent="  ") for p in paragraphs)
    return f"example:\n  {EXAMPLE}\n{body}"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``search`` subcommand to an ``argparse`` subparsers object."""
    from netpress._cli_specs import add_text_data_args

    s = subparsers.add_parser(
        "search", help="search per-layer pruning/quantization settings for an objective under "
        "fidelity constraints", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog())
    s.add_argument("--model", required=True, metavar="MODEL")
    s.add_argument("--weights", help="state dict to load into MODEL")
    s.add_argument("--data", required=True, metavar="DATA")
    s.add_argument("--task", default=None, help="what the trials measure: classification, "
                   "language-model, sentence-embedding, sentence-embedding:cls (default: "
                   "chosen from the model and data as in `netpress compress`)")
    add_text_data_args(s)
    s.add_argument("--objective", default="size",
                   choices=("size", "macs", "sparse_macs", "params", "latency", "latency_onnx"))
    s.add_argument("--constraint", action="append", default=[], metavar="CONSTRAINT",
                   help="repeatable (default: agreement>=0.99)")
    s.add_argument("--trials", type=int, default=10)
    s.add_argument("--strategy", default="auto",
                   choices=("auto", "gp", "tpe", "random", "knapsack", "gp+knapsack", "rl"),
                   help="auto: gp+knapsack on per-layer spaces, gp on recipe spaces")
    s.add_argument("--space", default="per-layer", metavar="SPACE")
    s.add_argument("--sparsity", default="0.0:0.9:0.05", help="LO:HI[:STEP] per layer "
                   "(empty: no pruning)")
    s.add_argument("--bits", default="4,8", help="weight bit widths to choose from (empty: "
                   "no quantization)")
    s.add_argument("--eval-limit", type=int, default=1000, help="inputs (texts) per trial "
                   "(the proxy)")
    s.add_argument("--recovery-steps", type=int, default=0, help="distillation steps per trial")
    s.add_argument("--final-recovery-steps", type=int, default=0,
                   help="distillation steps for the best configuration")
    s.add_argument("--journal", type=Path, help="resumable journal file (default: OUT/journal"
                   ".log)")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--ray-address", help="'local' or a Ray cluster address")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--latency-batch-size", type=int, default=1)
    s.add_argument("--batch-size", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    return s  # type: ignore[no-any-return]


def _range(text: str) -> Any:
    from netpress.search.space import Range

    if not text:
        return None
    try:
        parts = [float(p) for p in text.split(":")]
        return Range(parts[0], parts[1], parts[2] if len(parts) > 2 else None)
    except (ValueError, IndexError):
        raise RecipeError(f"--sparsity {text!r}: write LO:HI or LO:HI:STEP") from None


def _choice(text: str) -> Any:
    from netpress.search.space import Choice

    if not text:
        return None
    try:
        return Choice([int(b) for b in text.split(",")])
    except ValueError:
        raise RecipeError(f"--bits {text!r}: write bit widths separated by commas") from None


def build_space(args: argparse.Namespace, model: Any) -> Any:
    """The search space named by ``--space`` (see the subcommand's help)."""
    from netpress.search.space import LayerwiseSpace, RecipeSpace, Step, load_space

    sparsity, bits = _range(args.sparsity), _choice(args.bits)
    if args.space == "per-layer":
        return LayerwiseSpace(model, sparsity=sparsity, bits=bits)
    if args.space == "grouped":
        probe = LayerwiseSpace(model, sparsity=sparsity, bits=bits)
        groups: dict[str, list[str]] = {}
        for name in probe.groups:
            groups.setdefault(name.split(".")[0], []).append(name)
        return LayerwiseSpace(model, sparsity=sparsity, bits=bits, groups=groups)
    if args.space == "global":
        from netpress.prune.unstructured import GlobalMagnitudePrune
        from netpress.quant.lowbit import WeightOnly

        steps: list[Any] = []
        if sparsity is not None:
            steps.append(Step(GlobalMagnitudePrune, sparsity=sparsity))
        if bits is not None:
            steps.append(Step(WeightOnly, bits=bits))
        return RecipeSpace(steps)
    return load_space(args.space)


def _head(data: Any, limit: int, batch_size: int) -> list[Any]:
    from netpress.data import batches

    xs, ys, n = [], [], 0
    for x, y in batches(data, name="evaluate"):
        xs.append(x)
        ys.append(y)
        n += len(x)
        if n >= limit:
            break
    import torch

    x_all, y_all = torch.cat(xs)[:limit], torch.cat(ys)[:limit]
    return [(x_all[i:i + batch_size], y_all[i:i + batch_size])
            for i in range(0, len(x_all), batch_size)]


def _batch_head(data: Any, limit: int) -> list[Any]:
    """The first batches of ``data`` holding at least ``limit`` inputs, as they are (text
    batches of different lengths are not re-cut)."""
    from netpress._inputs import batch_size_of
    from netpress.data import batches

    out, n = [], 0
    for x, y in batches(data, name="evaluate"):
        out.append((x, y))
        n += batch_size_of(x)
        if n >= limit:
            break
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``netpress search`` with parsed ``args``; writes the results into ``--out``."""
    from netpress._cli_specs import resolve_data, resolve_model, resolve_task
    from netpress.recover.methods import Distill
    from netpress.search.runner import search

    print(f"search: loading the model {args.model} and the data {args.data} …", flush=True)
    model = resolve_model(args.model, args.weights)
    data = resolve_data(args.data, batch_size=args.batch_size, seed=args.seed,
                        model_spec=args.model, tokenizer=args.tokenizer,
                        max_length=args.max_length)
    if data.get("evaluate") is None:
        raise DataError(f"--data {args.data!r} gives no evaluation data to score trials on")
    task = resolve_task(args.task, model, data)
    if task != "classification":
        print(f"search: trials scored by the {task} task", flush=True)
    space = build_space(args, model)
    recovery = Distill(max_steps=args.recovery_steps) if args.recovery_steps else None
    final = Distill(max_steps=args.final_recovery_steps) if args.final_recovery_steps else None
    if (recovery or final) and data.get("train") is None:
        raise DataError("--recovery-steps/--final-recovery-steps need training data in --data")
    args.out.mkdir(parents=True, exist_ok=True)
    text = task != "classification" or args.data.startswith("text:")
    head = _batch_head(data["evaluate"], args.eval_limit) if text else _head(
        data["evaluate"], args.eval_limit, args.batch_size)
    result = search(
        model, space, objective=args.objective,
        constraints=args.constraint or ["agreement>=0.99"], trials=args.trials,
        strategy=args.strategy, evaluate=head, task=task,
        verify=data["evaluate"], calibration=data.get("calibration"), train=data.get("train"),
        recovery=recovery, final_recovery=final, seed=args.seed,
        journal=args.journal or args.out / "journal.log", ray_address=args.ray_address,
        workers=args.workers, threads=args.threads, progress=True)
    result.save(args.out)
    print(result.pareto_markdown())
    if result.best_recipe is None:
        print("no feasible configuration found")
        return 1
    final_info = result.final or {}
    print(f"best: trial {result.best_trial['number'] if result.best_trial else '-'}, "
          f"{result.objective}={result.best_value:,.0f} {result.unit}; verified: "
          f"{final_info.get('verified')} ({final_info.get('n_evaluated')} inputs)")
    print(f"wrote {args.out}/search.json, best_recipe.yaml, pareto.md, pareto.png")
    return 0
