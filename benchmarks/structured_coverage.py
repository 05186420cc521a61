"""Coverage of structured pruning: netpress and Torch-Pruning over every ``transformers`` model
class with a vision, text-encoder or decoder head (see ``_hf_zoo.py`` for the sweep and the
generic shrinking of its configs), plus netpress's own CIFAR CNNs.

Every model (random weights, nothing downloaded) is pruned to half its MACs from its example
inputs alone. netpress: ``prune_structured(model, StructuredPrune(macs=0.5), x)``, no data.
Torch-Pruning 1.6.1 (``pip install --no-deps torch-pruning==1.6.1``): ``MetaPruner`` with L2
magnitude, ``round_to=8``, the layers producing the model's outputs ignored (as its docs ask),
``output_transform`` picking the logits out of ``transformers`` outputs, attention heads
pruned whole (``num_heads`` from the q/k/v ``nn.Linear`` children of modules with a head-count
attribute, found by name), the pruning ratio bisected to the same target, and no other
per-model configuration.

A run *passes* when pruning completes, the pruned forward runs, the output shape is unchanged,
the outputs are finite and the MACs are at most 55% of the original's. A netpress failure that
is a netpress error (``ModelError``/``RecipeError``: the model was refused with a message) is
counted as *refused*; anything else as *failed*. Classes that cannot be built small are
*skipped* with the reason. netpress rows also carry the exactness check: 30% of every exact
group's units zeroed beforehand, then removed; the largest output change relative to the
output's largest magnitude (float rounding only when exact).

Each result is cached per model and tool under ``--cache`` (the sweep resumes where it stopped;
a model that killed the process is recorded as such), and the summary is written to ``--out``
(JSON) with a markdown table beside it::

    python benchmarks/structured_coverage.py --out benchmarks/results/structured_coverage.json
    python benchmarks/structured_coverage.py --speed HGNetV2ForImageClassification --image 224
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import re
import resource
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from _hf_zoo import BuildError, Entry, build, entries

from netpress._inputs import call_model, primary_output
from netpress.errors import NetpressError
from netpress.measure.macs import count_macs
from netpress.models import build_model
from netpress.prune.structured import StructuredPrune, prune_structured
from netpress.testing import prune_zeroed_units

TARGET = 0.5
PASS = 0.55
OURS = {"cifar_resnet56": "CIFAR ResNet-56 (A)", "cifar_resnet56_b": "CIFAR ResNet-56 (B)",
        "vgg16_cifar": "VGG-16", "mobilenet_v1_cifar": "MobileNet-V1",
        "mobilenet_v2_cifar": "MobileNet-V2"}
TOOLS = ("netpress", "torch_pruning")


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise _Timeout

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _outputs(model: nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        return primary_output(call_model(model, x))


def check(pruned: nn.Module, x: Any, shape: tuple[int, ...], base: int) -> dict[str, Any]:
    """The pass criteria: forward, shape, finite outputs, MACs at most 55%."""
    try:
        out = _outputs(pruned, x)
    except Exception as exc:
        return {"outcome": "failed", "error": _msg("forward fails", exc)}
    if tuple(out.shape) != shape:
        return {"outcome": "failed", "error": f"output shape {tuple(out.shape)} != {shape}"}
    if not bool(torch.isfinite(out).all()):
        return {"outcome": "failed", "error": "non-finite outputs"}
    ratio = count_macs(pruned, x) / base
    out_row = {"macs": round(ratio, 4)}
    if ratio > PASS + 1e-9:
        return {**out_row, "outcome": "failed", "error": f"MACs {ratio:.1%} > {PASS:.0%}"}
    return {**out_row, "outcome": "passed"}


def _msg(what: str, exc: BaseException) -> str:
    return " ".join(f"{what}: {type(exc).__name__}: {exc}".split())[:400]


def run_netpress(model: nn.Module, x: Any, shape: tuple[int, ...], base: int,
                 limit: int) -> dict[str, Any]:
    t = time.perf_counter()
    try:
        with time_limit(limit), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruned, info = prune_structured(model, StructuredPrune(macs=TARGET), x)
    except _Timeout:
        return {"outcome": "failed", "error": f"no result within {limit} s"}
    except NetpressError as exc:
        return {"outcome": "refused", "error": _msg(type(exc).__name__, exc),
                "seconds": round(time.perf_counter() - t, 2)}
    except Exception as exc:
        return {"outcome": "failed", "error": _msg("pruning fails", exc)}
    seconds = round(time.perf_counter() - t, 2)
    row = {**check(pruned, x, shape, base), "seconds": seconds,
           "warnings": sorted({str(w.message)[:300] for w in caught
                               if "StructuredPrune" in str(w.message)})}
    for key in ("excluded", "round_to_relaxed", "inexact_groups"):
        if info.get(key):
            row[key] = info[key]
    return row


def exactness(model: nn.Module, x: Any, limit: int, share: float = 0.3) -> float | str:
    """Zero every coupled slice of ``share`` of each exact group's units, remove them, and
    return the largest output change relative to the output's largest magnitude (0 = exact)."""
    try:
        with time_limit(limit):
            before, after = prune_zeroed_units(copy.deepcopy(model), x, share)
        return float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
    except Exception as exc:
        return _msg("", exc)


def _output_layers(model: nn.Module, shape: tuple[int, ...]) -> list[nn.Module]:
    """Linear/conv layers whose output width is the model output's last dim (heads)."""
    last = shape[-1]
    return [m for m in model.modules()
            if (isinstance(m, nn.Linear) and m.out_features == last)
            or (isinstance(m, nn.Conv2d) and m.out_channels == last and len(shape) == 2)]


_HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_head", "n_heads")
_QKV = re.compile(r"(^|_)(q|k|v|query|key|value|qkv|c_attn|wqkv|query_key_value)(_proj)?$",
                  re.IGNORECASE)


def head_layers(model: nn.Module) -> dict[nn.Module, int]:
    """Torch-Pruning's ``num_heads``, found generically: the q/k/v ``nn.Linear`` children
    (by name) of every module with a head-count attribute, mapped to that count (the
    key/value head count for k and v where the module has one)."""
    out: dict[nn.Module, int] = {}
    for m in model.modules():
        heads = next((v for a in _HEAD_ATTRS if isinstance(v := getattr(m, a, None), int)
                      and not isinstance(v, bool)), None)
        if not heads:
            continue
        kv = getattr(m, "num_key_value_heads", None)
        for name, child in m.named_children():
            if isinstance(child, nn.Linear) and _QKV.search(name):
                is_kv = name.lower().lstrip("_")[:1] in ("k", "v") and "query" not in name
                out[child] = kv if is_kv and isinstance(kv, int) and kv else heads
    return out


def run_torch_pruning(model: nn.Module, x: Any, shape: tuple[int, ...], base: int,
                      limit: int) -> dict[str, Any]:
    """Torch-Pruning to the target, given at most ``limit`` seconds."""
    try:
        import torch_pruning as tp
    except ImportError:
        return {"outcome": "failed", "error": "torch-pruning not installed"}

    def prune(ratio: float) -> nn.Module:
        m = copy.deepcopy(model)
        heads = head_layers(m)
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=ratio, round_to=8,
                                      ignored_layers=_output_layers(m, shape),
                                      output_transform=primary_output, num_heads=heads,
                                      prune_num_heads=bool(heads), prune_head_dims=not heads,
                                      head_pruning_ratio=ratio if heads else 0.0)
        pruner.step()
        return m

    t = time.perf_counter()
    lo, hi, best = 0.0, 0.95, None
    try:
        with time_limit(limit), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(6):
                mid = (lo + hi) / 2
                trial = prune(mid)
                try:
                    ratio = count_macs(trial, x) / base
                except Exception:
                    best = trial
                    break
                if ratio <= TARGET:
                    hi, best = mid, trial
                else:
                    lo = mid
            best = best if best is not None else prune(hi)
            row = check(best, x, shape, base)
    except _Timeout:
        return {"outcome": "failed", "error": f"no result within {limit} s"}
    except Exception as exc:
        return {"outcome": "failed", "error": _msg("pruning fails", exc)}
    return {**row, "seconds": round(time.perf_counter() - t, 2)}


def _build(name: str, entry: Entry | None) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    if entry is None:
        return build_model(name).eval(), torch.randn(1, 3, 32, 32)
    return build(entry)


def run_model(name: str, entry: Entry | None, tools: tuple[str, ...],
              limits: dict[str, int]) -> dict[str, Any]:
    try:
        model, x = _build(name, entry)
        shape = tuple(_outputs(model, x).shape)
        base = count_macs(model, x)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, BuildError) else _msg("", exc)
        return {"skipped": " ".join(reason.split())[:600]}
    row: dict[str, Any] = {"kind": entry.kind if entry else "cifar", "macs": base,
                           "params": sum(p.numel() for p in model.parameters())}
    if "netpress" in tools:
        row["netpress"] = run_netpress(model, x, shape, base, limits["netpress"])
        row["netpress"]["zeroed_units_rel_error"] = exactness(model, x, limits["netpress"])
    if "torch_pruning" in tools:
        row["torch_pruning"] = run_torch_pruning(model, x, shape, base, limits["torch_pruning"])
    return row


def _cached(cache: Path, tool: str, name: str,
            compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The cached result of ``name`` under ``tool``; a leftover marker means the process died
    while running it (recorded as a failure, never retried silently)."""
    path = cache / tool / f"{name.replace('/', '_').replace(' ', '_')}.json"
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("running"):
            data = {"outcome": "failed", "error": "the process died (memory or a crash)"}
            path.write_text(json.dumps(data))
        return dict(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"running": True}))
    data = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return data


def sweep(cache: Path, tools: tuple[str, ...], only: list[str] | None,
          limits: dict[str, int]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    todo: list[tuple[str, Entry | None]] = [(k, None) for k in OURS]
    todo += [(e.name, e) for e in entries()]
    for name, entry in todo:
        if only and name not in only:
            continue
        row: dict[str, Any] = {}
        for tool in tools:
            res = _cached(cache, tool, name,
                          lambda: run_model(name, entry, (tool,), limits))  # noqa: B023
            if "skipped" in res:
                row = {"skipped": res["skipped"]}
                break
            row.update({k: v for k, v in res.items() if k not in TOOLS})
            row[tool] = res.get(tool, res)
        rows[name] = row
        print(name, json.dumps(row)[:300], file=sys.stderr, flush=True)
    return rows


def summary(rows: dict[str, Any]) -> dict[str, Any]:
    built = {k: r for k, r in rows.items() if "skipped" not in r}
    out: dict[str, Any] = {"swept": len(rows), "skipped": len(rows) - len(built),
                           "buildable": len(built)}
    for tool in TOOLS:
        res = [r[tool] for r in built.values() if tool in r]
        if not res:
            continue
        counts = {o: sum(1 for r in res if r.get("outcome") == o)
                  for o in ("passed", "refused", "failed")}
        secs = sorted(r["seconds"] for r in res if "seconds" in r)
        out[tool] = {**counts, "pass_rate": round(counts["passed"] / max(1, len(res)), 4),
                     "median_seconds": secs[len(secs) // 2] if secs else None,
                     "max_seconds": secs[-1] if secs else None}
    errs = [r["netpress"].get("zeroed_units_rel_error") for r in built.values()
            if "netpress" in r]
    nums = [e for e in errs if isinstance(e, float) and math.isfinite(e)]
    out["exactness"] = {"checked": len(nums), "max_rel_error": max(nums) if nums else None,
                        "over_1e-4": sum(1 for e in nums if e > 1e-4)}
    return out


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    if r.get("outcome") == "passed":
        note = f" ({r['seconds']:.1f} s)" if "seconds" in r else ""
        return f"ok, {r['macs']:.1%} MACs{note}"
    err = str(r.get("error", "")).replace("|", "/")[:110]
    return f"{r.get('outcome')}: {err}"


def table(rows: dict[str, Any]) -> str:
    lines = ["| model | kind | netpress | exactness | Torch-Pruning 1.6.1 |",
             "|---|---|---|---|---|"]
    skipped = []
    for name, row in rows.items():
        if "skipped" in row:
            skipped.append(f"- {name}: {row['skipped'][:200]}")
            continue
        exact = row.get("netpress", {}).get("zeroed_units_rel_error")
        ex = f"{exact:.1e}" if isinstance(exact, float) else f"n/a ({str(exact)[:40]})"
        lines.append(f"| {name} | {row.get('kind', '')} | {_cell(row.get('netpress'))} | {ex} | "
                     f"{_cell(row.get('torch_pruning'))} |")
    s = summary(rows)
    lines.append("")
    lines.append(f"Swept {s['swept']}, skipped {s['skipped']}, buildable {s['buildable']}.")
    for tool in TOOLS:
        if tool in s:
            t = s[tool]
            lines.append(f"- {tool}: passed {t['passed']}, refused {t['refused']}, failed "
                         f"{t['failed']} ({t['pass_rate']:.1%} of the buildable); median "
                         f"{t['median_seconds']} s, max {t['max_seconds']} s")
    lines += ["", "Skipped:", *skipped]
    return "\n".join(lines)


def speed(class_name: str, image: int, rounds: int) -> list[float]:
    """Seconds of ``prune_structured(macs=0.5)`` on ``class_name`` with its *default* config
    (not shrunk) at ``image`` x ``image`` pixels, ``rounds`` times (fresh copies)."""
    import transformers

    cls = getattr(transformers, class_name)
    torch.manual_seed(0)
    model = cls(cls.config_class()).eval()
    x = torch.randn(1, 3, image, image)
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        prune_structured(model, StructuredPrune(macs=TARGET), x)
        out.append(round(time.perf_counter() - t, 2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("build/structured_coverage"),
                        help="one JSON per model and tool (the sweep resumes from it)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", nargs="*", help="model classes to run (default: all)")
    parser.add_argument("--tools", nargs="*", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--limit", type=int, default=120, help="seconds netpress gets per model")
    parser.add_argument("--peer-limit", type=int, default=90,
                        help="seconds Torch-Pruning gets per model")
    parser.add_argument("--memory-gb", type=int, default=8, help="address-space limit")
    parser.add_argument("--speed", metavar="CLASS",
                        help="only time netpress on this vision class's default config")
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.speed:
        torch.set_num_threads(1)
        print(args.speed, speed(args.speed, args.image, args.rounds))
        return
    limit = args.memory_gb << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(1)
    limits = {"netpress": args.limit, "torch_pruning": args.peer_limit}
    rows = sweep(args.cache, tuple(args.tools), args.only, limits)
    text = table(rows)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary(rows), "rows": rows}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
