"""The fidelity report: compare()'s new sections, markdown, the HTML page and thumbnails."""

from __future__ import annotations

import base64
import copy
import io
import json
import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import netpress as npr
from netpress.measure import compare
from netpress.measure.compare import MAX_FLIPPED_LISTED, disagreement_sections
from netpress.report import Report
from netpress.report.html import encode_png, thumbnails_for, to_html
from netpress.report.rows import pct as _pct
from netpress.testing import TinyMLP, toy_batches

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    reference = TinyMLP(classes=4).eval()
    compressed = copy.deepcopy(reference)
    with torch.no_grad():
        compressed.fc1.weight.add_(0.15 * torch.randn_like(compressed.fc1.weight))
    return reference, compressed


def _report(labeled: bool = True) -> tuple[dict[str, Any], list[Any]]:
    reference, compressed = _pair()
    data: list[Any] = toy_batches(n=96, batch=32)
    if not labeled:
        data = [(x, None) for x, _ in data]
    report = compare(reference, compressed, data=data, latency_batch_sizes=())
    report.update(netpress_version="test", recipe={"netpress_recipe": 1, "steps": []},
                  steps=[{"step": "GlobalMagnitudePrune", "sparsity": 0.5}])
    return report, data


def test_compare_adds_long_tail_confidence_and_flips() -> None:
    report, _ = _report()
    json.dumps(report, allow_nan=False)
    fid = report["fidelity"]
    for key in ("agreement", "mismatches", "per_class", "prediction_matrix", "kl_mean",
                "worst_class_agreement", "mismatches_on_reference_correct"):
        assert key in fid  # existing keys stay
    assert fid["mismatches"] > 0
    flipped = fid["flipped"]
    assert flipped["count"] == fid["mismatches"] == len(flipped["indices"])
    assert flipped["indices"] == sorted(flipped["indices"])
    assert all(a != b for a, b in zip(flipped["reference_pred"], flipped["compressed_pred"]))
    assert len(flipped["labels"]) == flipped["count"]
    matrix = fid["prediction_matrix"]
    for a, b in zip(flipped["reference_pred"], flipped["compressed_pred"]):
        assert matrix[a][b] > 0
    lt = fid["long_tail"]
    assert lt["proxy"] == "margin" and lt["n"] == 96 and lt["mismatches"] == fid["mismatches"]
    assert sum(lt["bins"]["count"]) == 96 and sum(lt["bins"]["mismatches"]) == lt["mismatches"]
    assert -1.0 <= lt["spearman"] <= 1.0
    shift = fid["confidence_shift"]
    assert sum(shift["histogram"]["counts"]) == 96 and shift["min"] <= shift["mean"] <= shift["max"]
    churn = fid["class_churn"]
    assert sum(churn["flips_out"]) == sum(churn["flips_in"]) == fid["mismatches"]


def test_compare_unlabeled_and_embedding_tasks() -> None:
    report, _ = _report(labeled=False)
    fid = report["fidelity"]
    assert fid["flipped"]["labels"] is None and fid["long_tail"]["proxy"] == "margin"
    json.dumps(report, allow_nan=False)
    reference, compressed = _pair()
    emb = compare(reference, compressed, data=toy_batches(n=32), task=npr.measure.EmbeddingTask(),
                  latency_batch_sizes=())
    assert "long_tail" not in emb["fidelity"] and "flipped" not in emb["fidelity"]


def test_loss_proxy_and_flip_list_limit() -> None:
    torch.manual_seed(3)
    ref, cmp = torch.randn(1000, 5), torch.randn(1000, 5)
    labels = torch.randint(0, 5, (1000,))
    out = disagreement_sections(ref, cmp, labels, proxy="loss")
    assert out["long_tail"]["proxy"] == "loss"
    assert out["flipped"]["count"] > MAX_FLIPPED_LISTED
    assert len(out["flipped"]["indices"]) == MAX_FLIPPED_LISTED
    assert len(out["flipped"]["labels"]) == MAX_FLIPPED_LISTED
    assert disagreement_sections(ref, cmp, None, proxy="loss")["long_tail"]["proxy"] == "margin"
    assert len(json.dumps(out)) < 20_000  # modest in size


def test_markdown_has_the_new_sections() -> None:
    report, _ = _report()
    md = Report(report).to_markdown()
    assert "## Long tail" in md and "## Confidence shift" in md
    assert f"## Flipped inputs: {report['fidelity']['flipped']['count']}" in md
    assert "agreement with reference" in md  # the summary table is still there


def test_html_page_has_numbers_plots_and_no_external_resources() -> None:
    pytest.importorskip("matplotlib")
    report, _ = _report()
    page = to_html(report)
    fid = report["fidelity"]
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert _pct(report["agreement"]) in page
    assert f"{fid['mismatches']} of {fid['n']}" in page
    assert f"{fid['long_tail']['spearman']:+.3f}" in page
    assert f"Flipped inputs ({fid['flipped']['count']})" in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4  # classes, matrix, long tail, confidence
    assert all(base64.b64decode(img).startswith(PNG_MAGIC) for img in images)
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page
    assert "<link" not in page and "@import" not in page


def test_html_escapes_report_text() -> None:
    report, _ = _report()
    evil = "<script>alert('x')</script>"
    report["steps"] = [{"step": evil, "note": evil}]
    report["fidelity"]["per_class"][0]["class"] = evil
    report["recipe"] = {"netpress_recipe": 1, "steps": [{"type": evil}]}
    report["task"] = evil
    page = to_html(report, plots={})
    assert "<script" not in page
    assert page.count("&lt;script&gt;") >= 4


def test_thumbnails_for_image_data() -> None:
    data = toy_batches(n=64, batch=16)
    thumbs = thumbnails_for(data, [40, 0, 17, 17])
    assert sorted(thumbs) == [0, 17, 40]
    assert all(png.startswith(PNG_MAGIC) for png in thumbs.values())
    image = pytest.importorskip("PIL.Image")
    decoded = image.open(io.BytesIO(thumbs[17]))
    assert decoded.size == (8, 8) and decoded.mode == "L"
    pixels = torch.from_numpy(np.array(decoded)).double()
    x = data[1][0][1, 0].double()  # input 17 = batch 1, row 1
    expected = ((x - x.min()) / (x.max() - x.min()) * 255).round()
    assert torch.equal(pixels, expected)
    assert len(thumbnails_for(data, range(64), max_n=5)) == 5


def test_thumbnails_rgb_and_non_image_data() -> None:
    rgb = [(torch.rand(4, 3, 6, 5), torch.zeros(4))]
    thumbs = thumbnails_for(rgb, [2])
    image = pytest.importorskip("PIL.Image")
    decoded = image.open(io.BytesIO(thumbs[2]))
    assert decoded.size == (5, 6) and decoded.mode == "RGB"
    assert thumbnails_for([(torch.randn(8, 16), torch.zeros(8))], [1]) == {}
    assert thumbnails_for([(torch.randint(0, 9, (8, 12)), None)], [1]) == {}
    assert thumbnails_for([((torch.randn(8, 1, 8, 8), torch.randn(8, 3)), None)], [1]) == {}
    assert thumbnails_for([({"input_ids": torch.zeros(8, 5)}, None)], [1]) == {}
    assert thumbnails_for(toy_batches(n=16), []) == {}


def test_encode_png_round_trip() -> None:
    image = pytest.importorskip("PIL.Image")
    pixels = torch.arange(12, dtype=torch.uint8).reshape(3, 4).numpy() * 20
    decoded = image.open(io.BytesIO(encode_png(pixels)))
    assert np.asarray(decoded).tolist() == pixels.tolist()
    with pytest.raises(ValueError, match="encode_png"):
        encode_png(torch.zeros(2, 2, 4, dtype=torch.uint8).numpy())


def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip drawing (plots have their own tests) to keep these tests fast."""
    import netpress.report.plots as plots

    monkeypatch.setattr(plots, "report_plots", lambda report: {})


def test_html_with_thumbnails_and_report_write(tmp_path: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _no_plots(monkeypatch)
    report, data = _report()
    flipped = report["fidelity"]["flipped"]["indices"]
    thumbs = thumbnails_for(data, flipped)
    page = Report(report, thumbs).to_html()
    assert page.count('alt="input ') == len(thumbs) > 0
    assert Report(report).to_html(thumbnails={}).count('alt="input ') == 0
    Report(report, thumbs).write(tmp_path)
    written = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert written == page
    assert not list(tmp_path.glob(".*.tmp"))
    assert Report.read(tmp_path).to_html().count('alt="input ') == 0  # thumbnails not in JSON
    Report(report).write(tmp_path / "plain", html=False)
    assert not (tmp_path / "plain" / "report.html").exists()


def test_compress_keeps_thumbnails_of_flipped_inputs(tmp_path: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _no_plots(monkeypatch)
    torch.manual_seed(0)
    model = TinyMLP(classes=4).eval()
    data = toy_batches(n=64, batch=32, model=model)
    result = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.9)], evaluate=data,
                          latency_batch_size=2)
    flipped = result.report["fidelity"]["flipped"]
    assert flipped["count"] > 0
    assert sorted(result.report.thumbnails) == flipped["indices"][:48]
    result.save_report(tmp_path)
    assert (tmp_path / "report.html").read_text(encoding="utf-8").count('alt="input ') == len(
        result.report.thumbnails)


def test_html_without_matplotlib_keeps_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    import netpress.report.plots as plots

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    report, _ = _report()
    page = to_html(report)
    assert "pip install 'netpress[report]'" in page and "<img" not in page
    assert "Per-class fidelity" in page and _pct(report["agreement"]) in page


def test_html_for_reports_without_classification_fidelity() -> None:
    reference, compressed = _pair()
    emb = compare(reference, compressed, data=toy_batches(n=32), task=npr.measure.EmbeddingTask(),
                  latency_batch_sizes=())
    page = to_html(emb)
    assert "<h2>Summary</h2>" in page and "Flipped inputs" not in page
    assert "Cosine similarity to the reference" in page and page.count("<img") == 1
    bare = to_html({})
    assert bare.startswith("<!DOCTYPE html>") and "netpress compression report" in bare
