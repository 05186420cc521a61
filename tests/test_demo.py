"""The embedded demo end to end: the issue's promised figures, as thresholds (not timings)."""

import json

import pytest
import torch

import netpress as npr
from netpress.demo import run_demo


@pytest.mark.slow
def test_demo_meets_its_promises(tmp_path):
    from rich.console import Console

    result = run_demo(tmp_path, progress=False, console=Console(file=open(tmp_path / "log", "w")))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"][0]["step"] == "GlobalMagnitudePrune"
    weights = [m.weight for m in result.model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert sparsity >= 0.80
    assert report["agreement"] >= 0.98
    assert report["reference"]["accuracy"] - report["compressed"]["accuracy"] <= 0.01
    assert report["size"]["reference_bytes"] / report["size"]["compressed_bytes"] >= 4.0
    for key in ("reference", "compressed"):
        assert report["macs"][key] > 0 and report["latency"][f"{key}_ms"] > 0
    loaded = npr.load(tmp_path / "model.npress")
    x = torch.randn(8, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded(x), result.model(x))
    for name in ("report.md", "recipe.yaml"):
        assert (tmp_path / name).stat().st_size > 0
    assert npr.Recipe.load(tmp_path / "recipe.yaml") == result.recipe
