"""Coverage of the post-training (one-shot) methods over every ``transformers`` model class
with a vision, text-encoder or decoder head (the sweep and its small configs: ``_hf_zoo.py``).

Every buildable class (random weights, nothing downloaded) goes through each method with its
default settings via ``npr.compress(model, [method], calibration=..., example_inputs=x)``:
``FisherPrune(macs=0.5)``, ``SparseGPT(sparsity=0.5)``, ``Wanda(sparsity=0.5)``,
``GPTQ(bits=4)`` and ``DynamicQuantize()``; then ``npr.export_onnx`` of the model (dict
inputs for text) and of the ``DynamicQuantize``'d model, both run in ONNX Runtime.
Calibration: 4 batches of 2 random inputs shaped like the example input; fidelity is
measured on a held-out random batch of 4.

A case *passes* when the method completes within the time limit, the forward runs, the
output shape is unchanged, the outputs are finite and the method did what it says:
FisherPrune at most 55% of the MACs; SparseGPT/Wanda at least 45% zeros over the layers they
support and fitted (layers never called on the calibration data are left dense, reported and
warned about, and counted in ``not_called``); GPTQ and DynamicQuantize at least one layer
swapped for its quantized module; an ONNX export whose ONNX Runtime outputs match the
PyTorch model's (relative error at most 1e-3 for float, 1e-2 for the INT8 model). A netpress
error (``ModelError``/``RecipeError``, a refusal with a message) is *refused*; anything else
is *failed*. Every row carries the relative output error ``‖y' - y‖ / ‖y‖`` against the
original and the top-1 agreement of the last dimension (logits).

Results are cached per method and class under ``--cache`` (resumable, as in
``structured_coverage.py``)::

    python benchmarks/oneshot_coverage.py --out benchmarks/results/oneshot_coverage.json
    python benchmarks/oneshot_coverage.py --sample --out ...   # the ~30-class sample
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from _common import cpu_flags
from _hf_zoo import SEQ, BuildError, Entry, build, entries
from structured_coverage import _cached, _msg, _Timeout, time_limit

import netpress as npr
from netpress._inputs import call_model, primary_output
from netpress.errors import NetpressError
from netpress.measure.macs import count_macs

METHODS = ("fisher", "sparsegpt", "wanda", "gptq", "dynamic", "onnx", "onnx_dynamic")
SAMPLE = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
          "GemmaForCausalLM", "Gemma2ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM",
          "GPT2LMHeadModel", "OPTForCausalLM", "FalconForCausalLM", "GPTNeoXForCausalLM",
          "GPTJForCausalLM", "BloomForCausalLM", "BertForMaskedLM", "RobertaForMaskedLM",
          "DebertaV2ForMaskedLM", "AlbertForMaskedLM", "DistilBertForMaskedLM",
          "ElectraForMaskedLM", "XLMRobertaForMaskedLM", "MPNetForMaskedLM",
          "ViTForImageClassification", "DeiTForImageClassification",
          "SwinForImageClassification", "ConvNextForImageClassification",
          "ResNetForImageClassification", "MobileViTForImageClassification",
          "BeitForImageClassification", "EfficientNetForImageClassification",
          "Dinov2ForImageClassification", "RegNetForImageClassification")
FISHER_TARGET, FISHER_PASS, SPARSITY = 0.5, 0.55, 0.5
KINDS = ("decoder", "encoder", "image")


def random_like(x: Any, batch: int, seed: int, vocab: int) -> Any:
    """A random batch shaped like the example input: token ids below ``vocab`` or pixels."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(x, dict):
        return {"input_ids": torch.randint(3, vocab, (batch, SEQ), generator=gen)}
    return torch.randn(batch, *x.shape[1:], generator=gen)


def _out(model: nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        return primary_output(call_model(model, x)).float()


def fidelity(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Relative output error and top-1 agreement of the last dimension."""
    rel = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    return {"rel_error": round(rel, 4), "agreement": round(agree, 4)}


def _zero_share(model: nn.Module, leave: set[str]) -> float:
    """Share of zeros over the weights of the layers the method supports, but ``leave``."""
    from netpress.reconstruct.layers import supported

    ws = [m.weight for n, m in model.named_modules() if supported(m) and n not in leave]
    return sum(int((w == 0).sum()) for w in ws) / max(1, sum(w.numel() for w in ws))


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _method(name: str) -> Any:
    from netpress.reconstruct import GPTQ, SparseGPT, Wanda

    return {"fisher": npr.FisherPrune(macs=FISHER_TARGET),
            "sparsegpt": SparseGPT(sparsity=SPARSITY), "wanda": Wanda(sparsity=SPARSITY),
            "gptq": GPTQ(bits=4),
            "dynamic": npr.DynamicQuantize(), "onnx_dynamic": npr.DynamicQuantize()}[name]


def did_it(method: str, model: nn.Module, result: nn.Module, x: Any,
           unused: list[str]) -> dict[str, Any]:
    """What the method did, and why it is a failure if it did not (``error``); ``unused``:
    the layers the step reported as never called on the calibration data (left dense, with
    a warning)."""
    from netpress.quant.dynamic import DynamicQuantLinear
    from netpress.reconstruct.modules import GroupQuantWeight

    if method == "fisher":
        ratio = count_macs(result, x) / count_macs(model, x)
        err = f"MACs {ratio:.1%} > {FISHER_PASS:.0%}" if ratio > FISHER_PASS + 1e-9 else None
        return {"macs": round(ratio, 4), "error": err}
    if method in ("sparsegpt", "wanda"):
        share = _zero_share(result, set(unused))
        return {"zeros": round(share, 4), "not_called": len(unused),
                "error": f"only {share:.1%} zeros" if share < 0.9 * SPARSITY else None}
    kind = GroupQuantWeight if method == "gptq" else DynamicQuantLinear
    n = _count(result, kind)
    return {"quantized_layers": n, "linear_layers": _count(model, nn.Linear),
            "error": None if n else f"no layer became a {kind.__name__}"}


def _onnx(model: nn.Module, x: Any, held: Any, tol: float) -> dict[str, Any]:
    """Export (at the default opset; again at the opset a refusal names, as its message tells
    the user to) and compare ONNX Runtime with PyTorch on ``held``."""
    from netpress.export.onnx import OrtModule

    opset = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = npr.export_onnx(model, Path(tmp) / "m.onnx", x)
        except NetpressError as exc:
            advised = re.search(r"export_onnx\(\.\.\., opset=(\d+)\)", str(exc))
            if not advised:
                raise
            opset = int(advised.group(1))
            path = npr.export_onnx(model, Path(tmp) / "m.onnx", x, opset=opset)
        ort = OrtModule(path)
        out = ort(**held) if isinstance(held, dict) else ort(held)
    fid = fidelity(_out(model, held), out.float())
    err = f"ONNX Runtime vs PyTorch rel. error {fid['rel_error']:.2e} > {tol:.0e}" \
        if not fid["rel_error"] <= tol else None
    return {"ort_vs_torch": fid, "error": err, **({"opset": opset} if opset else {})}


def run_case(method: str, model: nn.Module, x: Any, calib: list[Any], held: Any,
             limit: int) -> dict[str, Any]:
    """One method on one model, classified as passed / refused / failed."""
    t = time.perf_counter()
    ref = _out(model, held)
    try:
        with time_limit(limit), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result, unused = model, []
            if method != "onnx":
                res = npr.compress(model, [_method(method)], calibration=calib,
                                   example_inputs=x, measure=False)
                result, unused = res.model, res.report["steps"][0].get("not_called", [])
            extra = _onnx(result, x, held, 1e-2 if method == "onnx_dynamic" else 1e-3) \
                if method.startswith("onnx") else did_it(method, model, result, x, unused)
            out = _out(result, held)
    except _Timeout:
        return {"outcome": "failed", "error": f"no result within {limit} s"}
    except NetpressError as exc:
        if "_Timeout" in str(exc):  # the time limit fired inside a call netpress wraps
            return {"outcome": "failed", "error": f"no result within {limit} s"}
        return {"outcome": "refused", "error": _msg("netpress", exc),
                "seconds": round(time.perf_counter() - t, 2)}
    except Exception as exc:
        return {"outcome": "failed", "error": _msg("fails", exc)}
    row = {**extra, **fidelity(ref, out), "seconds": round(time.perf_counter() - t, 2)}
    if tuple(out.shape) != tuple(ref.shape):
        row["error"] = f"output shape {tuple(out.shape)} != {tuple(ref.shape)}"
    elif not bool(torch.isfinite(out).all()):
        row["error"] = "non-finite outputs"
    row["outcome"] = "failed" if row.get("error") else "passed"
    return {k: v for k, v in row.items() if v is not None}


def run_model(entry: Entry, method: str, limit: int) -> dict[str, Any]:
    try:
        model, x = build(entry)
    except BuildError as exc:
        return {"skipped": " ".join(str(exc).split())[:600]}
    vocab = getattr(model.config, "vocab_size", None) or 512
    vocab = max(4, min(vocab, 512))
    calib = [(random_like(x, 2, 100 + i, vocab), None) for i in range(4)]
    held = random_like(x, 4, 7, vocab)
    return {"kind": entry.kind, method: run_case(method, model, x, calib, held, limit)}


def sweep(cache: Path, methods: tuple[str, ...], only: set[str] | None, limit: int,
          kinds: tuple[str, ...], cached_only: bool = False) -> dict[str, Any]:
    """The rows of the classes of ``kinds`` (in that order), computed or from the cache;
    ``cached_only`` keeps to what the cache holds (nothing is computed)."""
    rows: dict[str, Any] = {}
    todo = sorted(entries(), key=lambda e: kinds.index(e.kind) if e.kind in kinds else -1)
    for entry in todo:
        if (only and entry.name not in only) or entry.kind not in kinds:
            continue
        if cached_only and not (cache / methods[0] / f"{entry.name}.json").exists():
            continue
        row: dict[str, Any] = {}
        for method in methods:
            if cached_only and not (cache / method / f"{entry.name}.json").exists():
                continue
            res = _cached(cache, method, entry.name, partial(run_model, entry, method, limit))
            if "skipped" in res:
                row = {"skipped": res["skipped"]}
                break
            row["kind"] = res.get("kind", row.get("kind"))
            row[method] = res.get(method, res)
        rows[entry.name] = row
        print(entry.name, json.dumps(row)[:400], file=sys.stderr, flush=True)
    return rows


def summary(rows: dict[str, Any], methods: tuple[str, ...]) -> dict[str, Any]:
    built = [r for r in rows.values() if "skipped" not in r]
    out: dict[str, Any] = {"swept": len(rows), "skipped": len(rows) - len(built)}
    for m in methods:
        res = [r[m] for r in built if m in r]
        out[m] = {o: sum(1 for r in res if r.get("outcome") == o)
                  for o in ("passed", "refused", "failed")}
    return out


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    if r.get("outcome") == "passed":
        what = next((f"{k} {r[k]}" for k in ("macs", "zeros", "quantized_layers") if k in r), "")
        opset = f" (opset {r['opset']})" if "opset" in r else ""
        return f"ok {what} err {r.get('rel_error')}{opset}".replace("  ", " ")
    return f"{r.get('outcome')}: {str(r.get('error', '')).replace('|', '/')[:90]}"


def table(rows: dict[str, Any], methods: tuple[str, ...]) -> str:
    lines = ["| model | kind | " + " | ".join(methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    skipped = []
    for name, row in rows.items():
        if "skipped" in row:
            skipped.append(f"- {name}: {row['skipped'][:200]}")
            continue
        lines.append(f"| {name} | {row.get('kind')} | "
                     + " | ".join(_cell(row.get(m)) for m in methods) + " |")
    s = summary(rows, methods)
    lines += ["", f"Swept {s['swept']}, skipped {s['skipped']}.", "",
              "| method | passed | refused | failed |", "|---|---|---|---|"]
    lines += [f"| {m} | {s[m]['passed']} | {s[m]['refused']} | {s[m]['failed']} |"
              for m in methods]
    return "\n".join([*lines, "", "Skipped:", *skipped])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("build/oneshot_coverage"),
                        help="one JSON per method and class (the sweep resumes from it)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", nargs="*", help="model classes to run (default: all)")
    parser.add_argument("--sample", action="store_true", help="only the ~30-class sample")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--limit", type=int, default=120, help="seconds per case")
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS,
                        help="kinds of class to sweep, in this order")
    parser.add_argument("--cached-only", action="store_true",
                        help="only summarize the classes the cache holds")
    parser.add_argument("--memory-gb", type=int, default=8, help="address-space limit")
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_AS, (args.memory_gb << 30, args.memory_gb << 30))
    torch.set_num_threads(1)
    only = set(args.only or ()) | (set(SAMPLE) if args.sample else set())
    methods = tuple(args.methods)
    rows = sweep(args.cache, methods, only or None, args.limit, tuple(args.kinds),
                 args.cached_only)
    text = table(rows, methods)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        import transformers

        payload = {"summary": summary(rows, methods), "cpu_flags": cpu_flags(),
                   "versions": {"torch": torch.__version__,
                                "transformers": transformers.__version__},
                   "command": "python benchmarks/oneshot_coverage.py "
                              + " ".join(argv if argv is not None else sys.argv[1:]),
                   "rows": rows}
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
