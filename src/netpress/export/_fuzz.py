"""A seeded fuzzer for the artefact loader (the test suite's few hundred cases, the benchmark's
thousands).

Each case takes a real artefact, breaks it one way (:data:`MUTATORS`: bit flips, truncations,
header-field values of every JSON type, names that collide or shadow, structural graph edits,
bombs), and loads it. A case passes when loading raises :class:`ArtefactError`, or loads and
the model's forward calls nothing outside the allowlists (checked by :func:`forward_calls`
with ``sys.setprofile``) and returns only tensors and plain values. Anything else, a raw
exception included, is a failure. :func:`main` runs cases in a worker process under an
address-space limit (``RLIMIT_AS``) and reports the counts and the peak memory growth.

Usage: ``python -m netpress.export._fuzz CORPUS_DIR --cases 300 --seed 0 --limit-mb 768``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from netpress.errors import ArtefactError

try:
    from netpress.export._mutations import MUTATORS, Parts, split, warm_bombs
except ImportError:  # run by path against another netpress tree (benchmarks/fuzz.py baseline)
    from _mutations import MUTATORS, Parts, split, warm_bombs  # type: ignore[no-redef]

__all__ = ["MUTATORS", "run_case", "forward_calls", "code_violations", "run_cases",
           "build_corpus", "load_corpus", "main"]


# -- what forward may call ---------------------------------------------------------------------
def _generated(code: Any) -> bool:
    return code.co_filename.startswith("<eval_with_key>")


def _allowlists() -> tuple[set[int], set[Any], tuple[type, ...]]:
    from torch import nn

    from netpress.export.graph import FUNCTIONS
    from netpress.export.modules import _REGISTRY, ALLOWED_MODULES

    c_ids = {id(f) for f in FUNCTIONS.values()}
    codes = {getattr(f, "__code__", None) for f in FUNCTIONS.values()} - {None}
    codes |= {nn.Module._wrapped_call_impl.__code__, nn.Module._call_impl.__code__,
              nn.Module.__getattr__.__code__}  # ``self.<path>``: submodules and tensors
    types = (*ALLOWED_MODULES.values(), *(e.cls for e in _REGISTRY.values()))
    return c_ids, codes, types


def forward_calls(model: Any, inputs: tuple[Any, ...]) -> tuple[list[str], Any]:
    """Run ``model(*inputs)``; list every call the generated forward makes that netpress's
    allowlists do not cover (functions, tensor methods, module types), and every output that
    is not a tensor or a plain value. Returns ``(violations, output or exception)``."""
    from netpress.export.graph import METHODS

    c_ids, codes, types = _allowlists()  # C-level warnings call warnings.py: harmless
    torch_dir = os.path.dirname(torch.__file__)
    bad: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and _generated(frame.f_code):
            ok = id(arg) in c_ids or (getattr(arg, "__name__", None) in METHODS and isinstance(
                getattr(arg, "__self__", None), torch.Tensor))
            if not ok:
                bad.append(f"C call {arg!r:.80}")
        elif event == "call" and frame.f_back is not None and _generated(frame.f_back.f_code):
            code = frame.f_code
            if code in (torch.nn.Module._wrapped_call_impl.__code__,):
                if not isinstance(frame.f_locals.get("self"), types):
                    bad.append(f"module {type(frame.f_locals.get('self')).__name__}")
            elif code not in codes and code.co_filename != warnings.__file__ and not (
                    code.co_name in METHODS and code.co_filename.startswith(torch_dir)):
                bad.append(f"call {code.co_name} in {code.co_filename}")

    result: Any
    sys.setprofile(profile)
    try:
        with torch.no_grad():
            result = model(*inputs)
    except Exception as exc:  # a mutated constant may break the forward: not an escape
        result = exc
    finally:
        sys.setprofile(None)
    if not isinstance(result, Exception):
        bad += [f"output of type {t}" for t in _foreign_leaves(result)]
    return bad, result


def code_violations(model: Any) -> list[str]:
    """Names in the generated forward's source that shadow what the code relies on: an
    argument or assignment named ``self``, ``torch``, a builtin or one of fx's globals."""
    import ast
    import builtins
    import keyword

    from torch.fx.graph import _custom_builtins

    source = getattr(model, "code", None)
    if not isinstance(source, str):
        return []
    # the oracle's own list (not the loader's): what generated code reads as globals
    used = {"self", "getattr", "slice", "Ellipsis", *keyword.kwlist, *_custom_builtins}
    tree = ast.parse(source)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            names = [a.arg for a in [*node.args.args, *node.args.kwonlyargs]]
            names += [a.arg for a in (node.args.vararg, node.args.kwarg) if a is not None]
            bad += [f"argument {n!r}" for n in names[1:] if n in used]
            if names[:1] != ["self"]:
                bad.append(f"first argument {names[:1]}")
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) \
                and (node.id in used or node.id in dir(builtins)):
            bad.append(f"assignment to {node.id!r}")
    return bad


def _foreign_leaves(value: Any) -> list[str]:
    plain = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device)
    stack, out = [value], []
    while stack:
        v = stack.pop()
        if isinstance(v, (tuple, list)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif not isinstance(v, plain):
            out.append(type(v).__name__)
    return out


# -- running cases -----------------------------------------------------------------------------
@dataclass
class Corpus:
    name: str
    data: bytes
    parts: Parts
    inputs: tuple[Any, ...]


def load_corpus(folder: Path) -> list[Corpus]:
    """Every ``*.npress`` in ``folder`` with its example input (``*.npress.in``, safetensors)."""
    from safetensors.torch import load_file

    out = []
    for path in sorted(folder.glob("*.npress")):
        data = path.read_bytes()
        inputs = tuple(load_file(f"{path}.in").values())
        out.append(Corpus(path.stem, data, split(data), inputs))
    return out


class _Extras(torch.nn.Module):
    """Tied weights, a fetched parameter and buffer, attention: what methods' toys lack."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = torch.nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight
        self.gate = torch.nn.Parameter(torch.full((8,), 0.5))
        self.register_buffer("offset", torch.linspace(-1, 1, 8))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx) * self.gate + self.offset
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(torch.relu(a + h).mean(dim=1))


def build_corpus(folder: Path, configs: dict[str, Any], needs_before: set[str],
                 transformer_only: frozenset[str] | set[str] = frozenset()) -> list[Path]:
    """One artefact per method config (applied to the toy models in turn; methods in
    ``transformer_only`` to the toy transformer) plus a model with tied weights, attention
    and fetched tensors, each with its example input."""
    import netpress as npr
    from netpress.config import Recipe
    from netpress.testing import toy_batches, toy_models, toy_transformer

    toys = list(toy_models().items())
    paths = []
    for i, (name, cfg) in enumerate(sorted(configs.items())):
        if "max_steps" in {f.name for f in dataclasses.fields(cfg)}:
            cfg = dataclasses.replace(cfg, max_steps=1)  # the artefact's kind, not its quality
        model = toy_transformer() if name in transformer_only else toys[i % len(toys)][1]
        data = toy_batches(n=32, model=model)
        before = (npr.GlobalMagnitudePrune(sparsity=0.5),) if name in needs_before else ()
        x = data[0][0][:2]
        result = npr.compress(model, Recipe((*before, cfg)), train=data, calibration=data,
                              evaluate=data, example_inputs=x[:1], measure=False)
        paths.append(_save(folder / f"{name}.npress", result.model, x, result.recipe.to_dict()))
    torch.manual_seed(0)
    extras = _Extras().eval()
    paths.append(_save(folder / "Extras.npress", extras, torch.tensor([[1, 2, 3], [4, 5, 19]]),
                       None))
    return paths


def _save(path: Path, model: Any, x: torch.Tensor, recipe: Any) -> Path:
    from safetensors.torch import save_file

    from netpress.export import save_artefact

    save_artefact(path, model, recipe=recipe, example_inputs=x)
    save_file({"x": x.contiguous()}, f"{path}.in")
    return path


def run_case(data: bytes, inputs: tuple[Any, ...], path: Path | None = None) -> tuple[str, str]:
    """``("refused" | "loaded" | "FAIL", detail)`` for one (possibly broken) artefact."""
    from netpress.export import load_artefact

    try:
        if path is not None:
            path.write_bytes(data)
        model = load_artefact(path if path is not None else data).model
    except ArtefactError as exc:
        text = str(exc)
        if "allocate" in text or "out of memory" in text:
            return "FAIL", f"memory: {text[:300]}"
        return "refused", text[:300]
    except BaseException as exc:  # the point: nothing else may escape
        if isinstance(exc, KeyboardInterrupt):
            raise
        return "FAIL", f"{type(exc).__name__}: {str(exc)[:300]}"
    bad = code_violations(model)
    if not bad:
        bad, _ = forward_calls(model, inputs)
    if bad:
        return "FAIL", f"forward reached outside the allowlists: {bad[:3]}"
    return "loaded", "forward ran"


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_cases(corpus: list[Corpus], cases: int, seed: int,
              folder: Path) -> dict[str, Any]:
    """Run ``cases`` seeded mutations over ``corpus``; counts by mutator and outcome."""
    counts: dict[str, dict[str, int]] = {m: {} for m in MUTATORS}
    failures: list[dict[str, Any]] = []
    names = sorted(MUTATORS)
    for i in range(cases):
        rng = random.Random(seed * 1_000_003 + i)
        item, mutator = rng.choice(corpus), names[i % len(names)]
        data = MUTATORS[mutator](rng, item.data, item.parts)
        path = folder / f"case{i % 4}.npress" if rng.random() < 0.25 else None
        outcome, detail = run_case(data, item.inputs, path)
        counts[mutator][outcome] = counts[mutator].get(outcome, 0) + 1
        if outcome == "FAIL":
            failures.append({"case": i, "seed": seed, "artefact": item.name,
                             "mutator": mutator, "detail": detail})
    return {"counts": counts, "failures": failures}


def _limit_memory(extra_mb: int) -> int:
    """Cap this process's address space at its current size plus ``extra_mb``."""
    limit = _rss("VmSize") + (extra_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return limit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-mb", type=int, default=768,
                    help="address space allowed above the worker's size after start-up")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from netpress.export.checkpoint import _load_builtin_types

    _load_builtin_types()
    corpus = load_corpus(args.corpus)
    clean = {c.name: run_case(c.data, c.inputs) for c in corpus}
    warm_bombs(corpus[0].parts.header)  # their payloads are built before the limit
    limit = _limit_memory(args.limit_mb)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS from here
    before, started = _rss("VmRSS"), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_cases(corpus, args.cases, args.seed, Path(tmp))
    result.update(cases=args.cases, seed=args.seed, seconds=round(time.perf_counter() - started,
                                                                  2),
                  clean=clean, peak_growth_bytes=_rss("VmHWM") - before,
                  address_space_limit=limit, corpus=[c.name for c in corpus])
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
