"""The netpress command line, run in-process on tiny settings."""

import json

import pytest

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
