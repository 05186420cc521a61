"""The netpress command line, run in-process on tiny settings."""

import json
import re

import pytest
import torch

from netpress.cli import build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "compress", "report", "export", "methods", "models"):
        assert cmd in out


@pytest.mark.parametrize("cmd", ["demo", "compress", "report"])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    assert "usage: netpress " + cmd in capsys.readouterr().out


def test_methods_and_models(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "GlobalMagnitudePrune" in out and "Distill" in out
    assert main(["models"]) == 0
    assert "cifar_resnet56" in capsys.readouterr().out


def test_compress_then_report(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("netpress_recipe: 1\nsteps:\n  - type: GlobalMagnitudePrune\n"
                      "    sparsity: 0.7\n  - type: FineTune\n    max_steps: 3\n")
    out = tmp_path / "out"
    code = main(["compress", "--model", "digits_cnn", "--recipe", str(recipe), "--data",
                 "digits", "--out", str(out), "--eval-limit", "64", "--train-limit", "128",
                 "--latency-batch-size", "4", "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["steps"][0]["sparsity"] == 0.7
    # the saved file also carries the report summary in its header: a few hundred bytes more
    assert abs((out / "model.npress").stat().st_size - report["size"]["compressed_bytes"]) < 4096
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "agreement" in capsys.readouterr().out
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert main(["report", str(out), "--html", str(tmp_path / "again.html")]) == 0
    assert "data:image/png;base64" in (tmp_path / "again.html").read_text()
    assert main(["report", str(out / "model.npress")]) == 0
    assert "GlobalMagnitudePrune" in capsys.readouterr().out
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(out / "model.npress"), "--onnx", str(onnx_path),
                 "--input-shape", "1,1,8,8", "--latency"]) == 0
    assert onnx_path.stat().st_size > 0 and "inputs/s" in capsys.readouterr().out
    assert main(["export", str(out / "model.npress"), "--onnx", str(onnx_path),
                 "--input-shape", "1x8"]) == 2


def test_compress_runs_structured_pruning_with_the_data_as_example(tmp_path):
    """StructuredPrune traces the model on an example input: the command line has none to
    give but its data, which compress() now takes one input of (it failed before)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - type: StructuredPrune\n    macs: 0.5\n    round_to: 1\n")
    out = tmp_path / "out"
    assert main(["compress", "--model", "digits_cnn", "--recipe", str(recipe), "--data",
                 "digits", "--out", str(out), "--eval-limit", "64", "--train-limit", "128",
                 "--latency-batch-size", "4", "--no-progress"]) == 0
    macs = json.loads((out / "report.json").read_text())["macs"]
    assert macs["compressed"] <= 0.55 * macs["reference"]


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("steps:\n  - type: Prunify\n")
    code = main(["compress", "--model", "digits_cnn", "--recipe", str(recipe), "--data",
                 "digits", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown method 'Prunify'" in err and "Traceback" not in err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert main(["compress", "--model", "no_such_model", "--recipe", str(recipe), "--data",
                 "digits", "--out", str(tmp_path / "o")]) == 2


def test_parser_builds():
    assert build_parser().prog == "netpress"


def _examples(text: str) -> list[list[str]]:
    """The command lines of an --help epilog, continuation lines joined."""
    import shlex

    joined = text.replace("\\\n", " ")
    return [shlex.split(line.strip())[1:] for line in joined.splitlines()
            if line.strip().startswith("netpress ")]


def test_every_help_example_parses(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    examples = _examples(out)
    # the old epilog lost its backslash: "--data cifar10:../shared/data       --objective"
    assert len(examples) == 7 and not re.search(r"\S {3,}--", out)
    search = next(e for e in examples if e[0] == "search")
    args = build_parser().parse_args(search)
    assert args.data == "cifar10:../shared/data" and args.objective == "size"
    for example in examples:
        build_parser().parse_args(example)


@pytest.mark.parametrize("cmd", ["compress", "search", "export"])
def test_help_documents_the_data_factory_form(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "package.module:factory returning a dict with any of the keys 'train', " \
           "'calibration' and 'evaluate'" in out.replace("factory (imported from the current "
                                                         "directory first) returning",
                                                         "factory returning")


FACTORIES = '''
import torch
from netpress.datasets import digits, loader
from netpress.models import DigitsCNN


def build():
    torch.manual_seed(0)
    return DigitsCNN()


def data():
    train, test = digits(seed=0)
    small = torch.utils.data.Subset(test, range(64))
    return {"train": loader(torch.utils.data.Subset(train, range(64)), batch_size=32),
            "evaluate": loader(small, batch_size=32)}


def wrong():
    return [1, 2]
'''


def test_factories_import_from_the_current_directory(tmp_path, monkeypatch, capsys):
    import sys

    (tmp_path / "mymodels_cli.py").write_text(FACTORIES)
    (tmp_path / "r.yaml").write_text("steps:\n  - type: GlobalMagnitudePrune\n"
                                     "    sparsity: 0.5\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    code = main(["compress", "--model", "mymodels_cli:build", "--recipe", "r.yaml", "--data",
                 "mymodels_cli:data", "--out", "out", "--latency-batch-size", "2",
                 "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["source"]["model"] == "mymodels_cli:build"
    assert report["source"]["cwd"] == str(tmp_path)
    capsys.readouterr()
    assert main(["compress", "--model", "mymodels_cli:build", "--recipe", "r.yaml", "--data",
                 "mymodels_cli:wrong", "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert "--data 'mymodels_cli:wrong' returned list; it must return a dict with any of " \
           "the keys 'train', 'calibration' and 'evaluate'" in err


@pytest.fixture(scope="module")
def int8_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "out"
    recipe = out.parent / "r.yaml"
    recipe.write_text("steps:\n  - type: GlobalMagnitudePrune\n    sparsity: 0.5\n"
                      "  - type: Quantize\n")
    weights = out.parent / "w.pt"
    torch.manual_seed(0)
    from netpress.models import DigitsCNN

    torch.save(DigitsCNN().state_dict(), weights)
    assert main(["compress", "--model", "digits_cnn", "--weights", str(weights), "--recipe",
                 str(recipe), "--data", "digits", "--out", str(out), "--eval-limit", "64",
                 "--train-limit", "128", "--latency-batch-size", "2", "--no-progress"]) == 0
    return out


def test_export_reads_the_input_shape_and_names_a_wrong_one(int8_out, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", str(int8_out / "model.npress"), "--onnx",
                 str(tmp_path / "m.onnx")]) == 0
    assert "(input shape 1,1,8,8)" in capsys.readouterr().out
    assert main(["export", str(int8_out / "model.npress"), "--onnx", str(tmp_path / "x.onnx"),
                 "--input-shape", "1,3,32,32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--input-shape 1,3,32,32 does not fit model.npress: layer 'features.0' " \
           "(QuantConv2d) expects 1 channel, got 3" in err
    assert "saved with input shape 1,1,8,8" in err and not (tmp_path / "x.onnx").exists()


def test_export_measures_agreement_and_times_the_reference(int8_out, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", str(int8_out / "model.npress"), "--onnx", str(tmp_path / "m.onnx"),
                 "--latency", "--repeats", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    report = json.loads((int8_out / "report.json").read_text())
    measured = report["onnx"]["fidelity"]["agreement"]  # the same export, during compress
    assert (f"exported model in ONNX Runtime, on 64 evaluation inputs: agreement "
            f"{100 * measured:.2f}% with the reference") in out
    assert "reference = digits_cnn (from report.json), FP32 ONNX export" in out
    for batch in (1, 32):
        assert re.search(rf"batch {batch}: reference [\d.]+ ms, compressed [\d.]+ ms "
                         rf"\([\d.]+ inputs/s\): [\d.]+x the reference's speed", out)


def test_export_measures_an_embedding_model_by_cosine(tmp_path):
    from netpress._cli_export import _figures, _recorded_task
    from netpress.measure.tasks import ClassificationTask, EmbeddingTask

    (tmp_path / "report.json").write_text(json.dumps(
        {"task": "embedding", "fidelity": {"threshold": 0.995}}))
    task = _recorded_task(tmp_path / "model.npress")
    assert isinstance(task, EmbeddingTask) and task.threshold == 0.995
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = torch.tensor([[1.0, 0.0], [0.1, 1.0]])  # cosines 1 and 0.995037
    assert _figures(task, ref, out) == "cosine mean 0.9975, rows with cosine ≥ 0.995: 100.00%"
    assert isinstance(_recorded_task(tmp_path / "elsewhere" / "m.npress"), ClassificationTask)
