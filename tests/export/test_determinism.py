"""Same seed, same artefact bytes; a model digest that says whether two artefacts hold the same
model; a clear error for models on the meta device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import netpress as npr
from netpress.cli import main
from netpress.export import dumps_artefact, load_artefact, model_digest, save_artefact
from netpress.testing import TinyCNN, toy_batches


def _run(tmp_path: Path, name: str) -> Path:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    data = toy_batches(model=model)
    result = npr.compress(model, npr.GlobalMagnitudePrune(sparsity=0.6), evaluate=data,
                          example_inputs=data[0][0][:1], seed=3)  # measure=True: timings too
    assert "latency.compressed_ms" in result.report.summary()
    path = tmp_path / name
    result.save(path)
    return path


def test_same_seed_gives_identical_artefact_bytes(tmp_path: Path) -> None:
    a, b = _run(tmp_path, "a.npress"), _run(tmp_path, "b.npress")
    assert a.read_bytes() == b.read_bytes()
    report = load_artefact(a).metadata["report"]
    assert "agreement" in report and not any(k.startswith("latency.") for k in report)


def test_model_digest_ignores_recipe_metadata_and_level(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    one = dumps_artefact(model, recipe={"steps": []}, metadata={"latency_ms": 1.0}, level=19)
    two = dumps_artefact(model, metadata={"latency_ms": 2.0}, level=1)
    assert one != two and model_digest(one) == model_digest(two)
    assert model_digest(one) == load_artefact(two).model_digest
    assert model_digest(one).startswith("sha256:") and len(model_digest(one)) == 71
    with torch.no_grad():
        model.fc.bias[0] = torch.nextafter(model.fc.bias[0], torch.tensor(1.0))  # one ulp
    assert model_digest(dumps_artefact(model)) != model_digest(one)


def test_netpress_digest_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    save_artefact(tmp_path / "a.npress", model, metadata={"run": 1})
    save_artefact(tmp_path / "b.npress", model, metadata={"run": 2})
    assert main(["digest", str(tmp_path / "a.npress"), str(tmp_path / "b.npress")]) == 0
    out = capsys.readouterr().out
    assert out.count("sha256:") == 2 and "same model" in out
    save_artefact(tmp_path / "c.npress", TinyCNN().eval())
    assert main(["digest", str(tmp_path / "a.npress"), str(tmp_path / "c.npress")]) == 1
    assert "different models" in capsys.readouterr().out


def test_meta_device_models_get_a_clear_error() -> None:
    with torch.device("meta"):
        model = TinyCNN()
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(npr.ModelError, match=r"parameter 'conv1.weight' is on the meta device.*"
                                             r"to_empty"):
        npr.compress(model, npr.GlobalMagnitudePrune(sparsity=0.5), example_inputs=x)
    with pytest.raises(npr.ModelError, match="'conv1.weight' .* is on the meta device"):
        dumps_artefact(model)
