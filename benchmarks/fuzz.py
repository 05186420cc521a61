"""The long run of the artefact-loader fuzzer (the test suite runs 360 cases; this, thousands).

Builds one artefact per registered method (the contract suite's configs on the toy models)
plus a model with tied weights, attention and fetched tensors, then runs the seeded cases of
:mod:`netpress.export._fuzz` in a worker process whose address space is capped at its
start-up size + ``--limit-mb``. Every case must end in an ArtefactError or in a model whose
forward stays inside the allowlists. With ``--baseline-src`` the same cases also run against
another source tree (e.g. the loader before issue 12) for comparison.

Run: ``python benchmarks/fuzz.py --cases 6000 [--baseline-src /tmp/before/src]``.
Writes ``benchmarks/results/fuzz.json`` and ``fuzz.md``.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _examples() -> tuple[dict[str, Any], set[str], set[str]]:
    spec = importlib.util.spec_from_file_location(
        "_contract_examples", ROOT / "tests" / "contract" / "test_methods.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EXAMPLES, module.NEEDS_COMPRESSION, getattr(module, "TRANSFORMER_ONLY", set())


def _run(corpus: Path, cases: int, seed: int, limit_mb: int, src: str | None) -> dict[str, Any]:
    import netpress.export._fuzz as fuzz

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
        if src:
            env["PYTHONPATH"] = src
        proc = subprocess.run([sys.executable, fuzz.__file__, str(corpus), "--cases",
                               str(cases), "--seed", str(seed), "--limit-mb", str(limit_mb),
                               "--out", str(out)], capture_output=True, text=True, env=env,
                              cwd=tmp)
        if proc.returncode:
            sys.exit(f"fuzz worker failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())  # type: ignore[no-any-return]


def _table(result: dict[str, Any]) -> str:
    rows = ["| mutation | cases | refused (ArtefactError) | loaded (forward checked) | failures |",
            "|---|---|---|---|---|"]
    for name, counts in sorted(result["counts"].items()):
        total = sum(counts.values())
        rows.append(f"| {name} | {total} | {counts.get('refused', 0)} | "
                    f"{counts.get('loaded', 0)} | {counts.get('FAIL', 0)} |")
    totals = collections.Counter()
    for counts in result["counts"].values():
        totals.update(counts)
    rows.append(f"| **all** | {sum(totals.values())} | {totals['refused']} | {totals['loaded']}"
                f" | {totals['FAIL']} |")
    return "\n".join(rows)


def _failure_kinds(result: dict[str, Any]) -> list[tuple[int, str]]:
    kinds = collections.Counter(f"{f['mutator']}: {f['detail'][:90]}"
                                for f in result["failures"])
    return [(n, k) for k, n in kinds.most_common(12)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--limit-mb", type=int, default=768)
    ap.add_argument("--baseline-src", help="also run the cases against this source tree")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fuzz.json")
    args = ap.parse_args()
    import torch

    from netpress.export._fuzz import build_corpus

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp)
        examples, needs, transformer_only = _examples()
        build_corpus(corpus, examples, needs, transformer_only)
        runs = {"this tree": _run(corpus, args.cases, args.seed, args.limit_mb, None)}
        if args.baseline_src:
            runs["baseline"] = _run(corpus, args.cases, args.seed, args.limit_mb,
                                    args.baseline_src)
    cpu = subprocess.run("grep -o -wE 'avx512_vnni|avx_vnni|avx2' /proc/cpuinfo | sort -u",
                         shell=True, capture_output=True, text=True).stdout.split()
    payload = {"cases": args.cases, "seed": args.seed, "limit_mb": args.limit_mb,
               "cpu_flags": cpu, "baseline_src": args.baseline_src,
               "runs": {k: {key: v[key] for key in ("counts", "seconds", "peak_growth_bytes",
                                                    "corpus", "clean")}
                        | {"failures": v["failures"][:50], "n_failures": len(v["failures"])}
                        for k, v in runs.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"# Artefact loader fuzzer: {args.cases} cases, seed {args.seed}", "",
             f"CPU flags: {' '.join(cpu)}. Worker address space capped at start-up + "
             f"{args.limit_mb} MiB.", ""]
    for name, result in runs.items():
        lines += [f"## {name}", "", _table(result), "",
                  f"{result['seconds']} s; peak resident memory grew by "
                  f"{result['peak_growth_bytes'] / 2**20:.1f} MiB.", ""]
        lines += [f"- {n} x {k}" for n, k in _failure_kinds(result)] + [""]
        print("\n".join(lines[-(len(_failure_kinds(result)) + 6):]), flush=True)
    args.out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
