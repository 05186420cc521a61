"""Report plots: valid, legible PNGs drawn from report sections."""

from __future__ import annotations

import struct
import sys
from typing import Any

import pytest
import torch

from netpress.measure.compare import disagreement_sections
from netpress.measure.fidelity import classification_fidelity
from netpress.report.plots import (
    MAX_BAR_CLASSES,
    class_plot,
    confidence_plot,
    long_tail_plot,
    matrix_plot,
    report_plots,
)

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _size(png: bytes) -> tuple[int, int]:
    assert png.startswith(PNG_MAGIC) and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


def _fidelity(classes: int, n: int = 400, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, classes, generator=g) * 3
    cmp = ref + torch.randn(n, classes, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    fid = classification_fidelity(ref, cmp, labels)
    fid.update(disagreement_sections(ref, cmp, labels))
    return fid


def test_every_plot_is_a_legible_png() -> None:
    fid = _fidelity(10)
    plots = report_plots({"fidelity": fid})
    assert set(plots) == {"classes", "matrix", "confidence", "long_tail"}
    for png in plots.values():
        width, height = _size(png)
        assert width >= 700 and height >= 400  # big enough for 10-pt text at 100% zoom


def test_plots_handle_many_classes() -> None:
    fid = _fidelity(60, n=600)
    png = class_plot(fid["per_class"], fid["class_churn"], fid["agreement"])
    assert _size(png)[0] >= 700
    assert len(fid["per_class"]) > MAX_BAR_CLASSES
    assert _size(matrix_plot(fid["prediction_matrix"]))[1] >= 700


def test_plots_handle_perfect_agreement() -> None:
    logits = torch.randn(50, 3)
    fid = classification_fidelity(logits, logits, torch.randint(0, 3, (50,)))
    fid.update(disagreement_sections(logits, logits, None))
    assert fid["long_tail"]["spearman"] is None
    assert _size(long_tail_plot(fid["long_tail"]))[0] > 0
    assert _size(confidence_plot(fid["confidence_shift"]))[0] > 0
    assert _size(matrix_plot(fid["prediction_matrix"]))[0] > 0
    assert _size(class_plot(fid["per_class"], fid["class_churn"]))[0] > 0


def test_report_plots_skips_missing_sections() -> None:
    assert report_plots({"fidelity": None}) == {}
    fid = _fidelity(4)
    fid["prediction_matrix"] = None
    del fid["long_tail"]
    assert set(report_plots({"fidelity": fid})) == {"classes", "confidence"}


def test_import_netpress_does_not_import_matplotlib() -> None:
    import subprocess

    code = ("import sys, netpress, netpress.report.html, netpress.report.plots, "
            "netpress.measure.longtail; print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
