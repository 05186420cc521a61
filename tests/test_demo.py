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


def test_the_trained_reference_is_cached_by_seed_and_version(tmp_path):
    import io

    from rich.console import Console

    from netpress.datasets import digits, loader
    from netpress.demo import _cache_file, _reference
    from netpress.report.report import netpress_version
    from netpress.testing import state_equal

    train, _ = digits(seed=0)
    data = loader(torch.utils.data.Subset(train, range(64)), batch_size=32)
    cache = _cache_file(tmp_path, seed=3, epochs=1)
    assert cache is not None and cache.parent == tmp_path / ".cache"
    assert "seed3-epochs1" in cache.name and f"netpress{netpress_version()}" in cache.name
    assert _cache_file(tmp_path, seed=4, epochs=1) != cache
    log = io.StringIO()
    console = Console(file=log, width=200)
    first = _reference(data, seed=3, epochs=1, cache=cache, progress=False, console=console)
    assert "training the reference DigitsCNN" in log.getvalue() and cache.is_file()
    second = _reference(data, seed=3, epochs=1, cache=cache, progress=False, console=console)
    assert f"reusing the trained reference from {cache}" in log.getvalue()
    assert state_equal(first, second)
    cache.write_bytes(b"not safetensors")  # a damaged cache trains again, never crashes
    third = _reference(data, seed=3, epochs=1, cache=cache, progress=False, console=console)
    assert "training again" in log.getvalue() and state_equal(first, third)


def test_make_install_says_what_it_installs():
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("needs make")
    root = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "-B", "-C", str(root), ".venv/.netpress-installed"],
                         capture_output=True, text=True, check=True).stdout
    assert "installing torch==2.13.0" in dry
    assert "installing netpress (editable) and its extras dev, data, onnx, report" in dry
    assert "--quiet" not in dry  # pip's own lines name each package as it goes
