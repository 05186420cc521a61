"""The loader fuzzer: a few hundred seeded cases over real artefacts of every method, in a
worker process under an address-space limit (netpress.export._fuzz; the long run is
benchmarks/fuzz.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx, nn

from netpress.export import _fuzz
from netpress.export.graph import trace

CASES = int(os.environ.get("NETPRESS_FUZZ_CASES", "360"))
SEED = int(os.environ.get("NETPRESS_FUZZ_SEED", "0"))


def contract_examples() -> tuple[dict[str, Any], set[str], set[str]]:
    """The contract suite's config for every registered method."""
    path = Path(__file__).parents[1] / "contract" / "test_methods.py"
    spec = importlib.util.spec_from_file_location("_contract_examples", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EXAMPLES, module.NEEDS_COMPRESSION, getattr(module, "TRANSFORMER_ONLY", set())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    examples, needs_before, transformer_only = contract_examples()
    _fuzz.build_corpus(folder, examples, needs_before, transformer_only)
    return folder


def test_every_method_has_an_artefact_in_the_corpus(corpus: Path) -> None:
    import netpress as npr

    names = {p.stem for p in corpus.glob("*.npress")}
    assert {m.name for m in npr.list_methods()} <= names and "Extras" in names


def test_fuzzed_artefacts_fail_only_with_artefact_errors(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, "-m", "netpress.export._fuzz", str(corpus),
                           "--cases", str(CASES), "--seed", str(SEED), "--limit-mb", "768",
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert all(outcome == "loaded" for outcome, _ in result["clean"].values()), result["clean"]
    assert not result["failures"], json.dumps(result["failures"][:10], indent=1)
    counts = result["counts"]
    assert set(counts) == set(_fuzz.MUTATORS) and all(c.get("refused") for c in counts.values())
    assert sum(c.get("loaded", 0) for c in counts.values()) > 0  # harmless edits load
    assert counts["bomb"] == {"refused": counts["bomb"]["refused"]}
    # gigabyte bombs ran under an address-space limit of start-up + 768 MiB; resident memory
    # grew by a few MiB at most
    assert result["peak_growth_bytes"] < 128 << 20, result["peak_growth_bytes"]


def _graph_module_with(node_name: str, fn: Any) -> fx.GraphModule:
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.create_node("call_function", fn, (x,), {}, name=node_name)
    graph.output(y)
    return fx.GraphModule(nn.Module(), graph)


def test_the_checks_catch_what_the_old_loader_let_through() -> None:
    # a node named self, as fx builds it when names are not checked
    assert _fuzz.code_violations(_graph_module_with("self", torch.relu)) == [
        "assignment to 'self'"]
    assert _fuzz.code_violations(trace(nn.Sequential(nn.Linear(2, 2)))) == []
    # a call outside the allowlists, reached in forward
    bad, _ = _fuzz.forward_calls(_graph_module_with("n", os.path.basename), ("a/b",))
    assert bad and "basename" in bad[0]
    good, out = _fuzz.forward_calls(trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU())),
                                    (torch.ones(1, 2),))
    assert good == [] and isinstance(out, torch.Tensor)
    bad, _ = _fuzz.forward_calls(_graph_module_with("n", torch.Tensor.numpy), (torch.ones(2),))
    assert any("numpy" in b for b in bad)  # a numpy array would come back, too
