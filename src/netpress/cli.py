"""The ``netpress`` command line: a thin layer over :mod:`netpress.api`."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]

EPILOG = """examples:
  netpress demo --out demo-out
  netpress compress --model cifar_resnet56 --weights resnet56.th --recipe recipe.yaml \\
      --data cifar10:../shared/data/cifar10 --out out/
  netpress report out/
  netpress export out/model.npress --onnx out/model.onnx --latency
  netpress search --model cifar_resnet20 --weights resnet20.th --data cifar10:../shared/data \\
      --objective size --constraint "agreement>=0.99" --trials 10 --out search-out/
  netpress digest a.npress b.npress
  netpress methods
"""

def _wrap(*paragraphs: str) -> str:
    import textwrap

    return "\n".join(textwrap.fill(p, width=79, subsequent_indent="  ") for p in paragraphs)


MODEL_HELP = ("MODEL: a built-in name (see `netpress models`), a .npress file, hf:DIR (a "
              "local transformers directory), or package.module:factory (imported from the "
              "current directory first, as `python -m` does; the factory returns an "
              "nn.Module).")


def _data_help() -> str:
    from netpress._cli_specs import DATA_FORM

    return ("DATA: digits, cifar10:DIR, mnist:DIR, fashion-mnist:DIR (their preprocessing: "
            "README, 'Data sets'), text:FILE (a .txt file, one text per line, or .jsonl with "
            "'text' and optional integer 'label' per line; tokenized with the model's "
            "tokenizer, 20% held out for evaluation, at most 1,000), or "
            "package.module:factory (imported from the current "
            f"directory first) returning {DATA_FORM}.")


def build_parser() -> argparse.ArgumentParser:
    from netpress._cli_specs import add_text_data_args

    p = argparse.ArgumentParser(
        prog="netpress", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compress trained PyTorch models without changing what they predict.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="train a small CNN on scikit-learn digits, compress it, "
                       "and print the report (no download)")
    d.add_argument("--out", type=Path, help="write report.json, report.md, report.html, "
                   "recipe.yaml and model.npress here")
    d.add_argument("--sparsity", type=float, default=0.85, help="global sparsity (default 0.85)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")

    c = sub.add_parser("compress", help="compress a model with a recipe and write the artefact "
                       "and report", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_wrap(MODEL_HELP, _data_help()))
    c.add_argument("--model", required=True, metavar="MODEL")
    c.add_argument("--weights", help="state dict to load into MODEL (.pt/.pth/.th loaded with "
                   "weights_only=True, or .safetensors)")
    c.add_argument("--recipe", required=True, type=Path, help="recipe file (.yaml or .json)")
    c.add_argument("--data", required=True, metavar="DATA")
    c.add_argument("--out", required=True, type=Path, help="output directory")
    c.add_argument("--task", default=None, help="classification, embedding, or embedding:T "
                   "to count the rows with cosine >= T (default 0.99); for text: "
                   "language-model, sentence-embedding, sentence-embedding:cls. Default: "
                   "chosen from the model and data (text without labels: language-model for "
                   "a causal LM, sentence-embedding for an encoder; else classification)")
    add_text_data_args(c)
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--train-limit", type=int, help="use at most this many training examples")
    c.add_argument("--eval-limit", type=int, help="evaluate on at most this many examples")
    c.add_argument("--latency-batch-size", type=int, default=32)
    c.add_argument("--threads", type=int, default=1, help="threads for latency measurement")
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the model's)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-progress", action="store_true")

    r = sub.add_parser("report", help="print the report in DIR (or an artefact's summary)")
    r.add_argument("path", type=Path, help="a directory with report.json, or a .npress file")
    r.add_argument("--markdown", action="store_true", help="print markdown instead of a table")
    r.add_argument("--html", type=Path, metavar="FILE", help="also write the HTML report "
                   "(with plots) to FILE")

    e = sub.add_parser(
        "export", help="write a .npress artefact as ONNX (QDQ INT8 when quantized), measure "
        "its agreement in ONNX Runtime and optionally time it beside the reference",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_wrap("The reference and evaluation data default to those `netpress compress` "
                     "recorded in report.json beside the artefact. Without a reference, "
                     "--latency times the artefact's FP32 twin (same architecture, float "
                     "weights) as the reference.", MODEL_HELP, _data_help()))
    e.add_argument("artefact", type=Path, help="a .npress file")
    e.add_argument("--onnx", required=True, type=Path, help="output .onnx path")
    e.add_argument("--input-shape", help="one input's shape, batch first, e.g. 1,3,32,32 "
                   "(default: the shape stored in the artefact)")
    e.add_argument("--sequence-length", type=int, metavar="N", help="text models: the "
                   "token count of the example input, the length --latency times (default: "
                   "the example recorded in the artefact; any length runs in the export)")
    e.add_argument("--opset", type=int, default=17)
    e.add_argument("--latency", action="store_true", help="time the exported model and the "
                   "reference's FP32 export in ONNX Runtime, interleaved, and print the ratio")
    e.add_argument("--reference", metavar="MODEL", help="the uncompressed model, for "
                   "agreement and latency")
    e.add_argument("--weights", help="state dict to load into --reference")
    e.add_argument("--data", metavar="DATA", help="evaluation data: measure the exported "
                   "model's agreement in ONNX Runtime")
    e.add_argument("--eval-limit", type=int, help="evaluate on at most this many examples")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--latency-batch-size", type=int, default=32)
    e.add_argument("--repeats", type=int, default=30, help="timed runs per model and batch size")
    e.add_argument("--no-progress", action="store_true")

    g = sub.add_parser("digest", help="print the model digest of .npress files (equal digests: "
                       "the same model, whatever the recipe, report or compression level)")
    g.add_argument("artefacts", type=Path, nargs="+", metavar="FILE")

    from netpress.search.cli import add_parser as _add_search

    _add_search(sub)
    sub.add_parser("methods", help="list the compression methods")
    sub.add_parser("models", help="list the built-in model names")
    return p


def _cmd_demo(args: argparse.Namespace) -> int:
    from netpress.demo import run_demo

    run_demo(args.out, sparsity=args.sparsity, seed=args.seed,
             progress=False if args.no_progress else None)
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from rich.console import Console

    from netpress._cli_specs import resolve_data, resolve_model, resolve_task, source_record
    from netpress.api import compress
    from netpress.config import Recipe
    from netpress.recover.distributed import init_from_env, is_main
    from netpress.report import Report, ReportWarning

    console = Console(stderr=True)
    if init_from_env() and args.device is None:  # under torchrun: one GPU per rank
        import os

        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    recipe = Recipe.load(args.recipe)
    console.print(f"netpress compress: loading the model {args.model} …")
    model = resolve_model(args.model, args.weights)
    console.print(f"netpress compress: loading the data {args.data} …")
    data = resolve_data(args.data, batch_size=args.batch_size, train_limit=args.train_limit,
                        eval_limit=args.eval_limit, seed=args.seed, model_spec=args.model,
                        tokenizer=args.tokenizer, max_length=args.max_length)
    task = resolve_task(args.task, model, data)
    console.print(f"netpress compress: running {len(recipe)} step(s), then measuring the "
                  f"report …")
    with warnings.catch_warnings():  # the table below shows them, in a red panel
        warnings.simplefilter("ignore", ReportWarning)
        result = compress(model, recipe, seed=args.seed, device=args.device,
                          threads=args.threads, latency_batch_size=args.latency_batch_size,
                          task=task, progress=False if args.no_progress else None, **data)
    if not is_main():  # data-parallel recovery: rank 0 writes the artefact and report
        return 0
    source = {**source_record(args.model, args.weights, args.data, args.eval_limit,
                              result.reference), "task": task}
    if args.data.startswith("text:"):  # what `netpress export` needs to tokenize it again
        source.update(tokenizer=str(Path(args.tokenizer).resolve()) if args.tokenizer else None,
                      max_length=args.max_length, seed=args.seed)
    result.report = Report({**result.report, "source": source}, result.report.thumbnails)
    args.out.mkdir(parents=True, exist_ok=True)
    size = result.save(args.out / "model.npress")
    recipe.save(args.out / "recipe.yaml")
    result.save_report(args.out)
    out = Console()
    result.report.print(out)
    out.print(f"wrote {args.out}/model.npress ({size:,} bytes), report.json, report.md, "
              f"report.html")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import json

    from netpress.report import Report

    if args.path.suffix == ".npress":
        from netpress.export import read_header

        header = read_header(args.path)
        print(json.dumps({k: header.get(k) for k in ("netpress_version", "recipe", "metadata")},
                         indent=2))
        return 0
    report = Report.read(args.path)
    if args.html:
        from netpress._atomic import atomic_write

        atomic_write(args.html, report.to_html())
        print(f"wrote {args.html}")
    if args.markdown:
        print(report.to_markdown())
    else:
        report.print()
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from netpress._cli_export import run_export

    return run_export(args)


def _cmd_digest(args: argparse.Namespace) -> int:
    from netpress.export import model_digest

    digests = [model_digest(path) for path in args.artefacts]
    for path, digest in zip(args.artefacts, digests):
        print(f"{digest}  {path}")
    if len(digests) > 1:
        same = len(set(digests)) == 1
        print("same model" if same else "different models")
        return 0 if same else 1
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from netpress.search.cli import run

    return run(args)


def _cmd_methods(_: argparse.Namespace) -> int:
    from netpress.registry import list_methods

    for m in list_methods():
        needs = f"  (needs {', '.join(m.needs)})" if m.needs else ""
        print(f"{m.kind:<9} {m.name:<26} {m.summary}{needs}")
    return 0


def _cmd_models(_: argparse.Namespace) -> int:
    from netpress.models import MODELS

    for name in sorted(MODELS):
        print(name)
    return 0


COMMANDS = {"demo": _cmd_demo, "compress": _cmd_compress, "report": _cmd_report,
            "export": _cmd_export, "search": _cmd_search, "methods": _cmd_methods,
            "models": _cmd_models, "digest": _cmd_digest}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``netpress`` command."""
    from netpress.errors import NetpressError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except NetpressError as exc:
        print(f"netpress {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
