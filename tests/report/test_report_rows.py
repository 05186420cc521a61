"""What the report says, in every form (terminal, markdown, HTML): task metrics, long-tail
units, empty plots and warnings, each checked against a hand-computed value."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn

from netpress.measure import EmbeddingTask, compare
from netpress.measure.compare import disagreement_sections
from netpress.report import plots
from netpress.report.html import to_html
from netpress.report.render import print_table, to_markdown
from netpress.report.rows import difficulty_labels, rows


def _embedding_report() -> dict[str, Any]:
    torch.manual_seed(0)
    reference = nn.Linear(8, 8).eval()
    compressed = copy.deepcopy(reference)
    with torch.no_grad():
        compressed.weight.add_(0.1 * torch.randn_like(compressed.weight))
    data = [(torch.randn(32, 8), None) for _ in range(2)]
    return compare(reference, compressed, data=data, task=EmbeddingTask(threshold=0.995),
                   latency_batch_sizes=())


def test_embedding_metrics_appear_in_table_markdown_html_and_terminal() -> None:
    report = _embedding_report()
    fid = report["fidelity"]
    table = {row[0]: row[1:] for row in rows(report)}
    assert table["cosine similarity to reference, mean"][1] == f"{fid['cosine_mean']:.4f}"
    q = fid["cosine"]["quantiles"]
    assert table["  … min / p01 / p05 / median"][1] == " / ".join(
        f"{q[k]:.4f}" for k in ("min", "p01", "p05", "median"))
    share = table["rows with cosine ≥ 0.995 (your threshold)"][1]
    assert share == f"{100 * fid['agreement']:.2f}%"
    assert "agreement with reference" not in table  # no bare "agreement 0.00%" headline
    shares = fid["cosine"]["share_at_least"]
    assert table["rows with cosine ≥ 0.9 / 0.95 / 0.99 / 0.999"][1] == " / ".join(
        f"{100 * shares[t]:.1f}%" for t in ("0.9", "0.95", "0.99", "0.999"))
    md = to_markdown(report)
    assert "## Cosine similarity to the reference" in md and f"{q['p05']:.5f}" in md
    page = to_html(report)
    assert "Cosine similarity to the reference" in page and "rows with cosine ≥ 0.995" in page
    buffer = io.StringIO()
    from rich.console import Console

    print_table(report, Console(file=buffer, width=160))
    assert "rows with cosine ≥ 0.995 (your threshold)" in buffer.getvalue()


def test_long_tail_bins_read_as_margins_in_markdown() -> None:
    long_tail = {"proxy": "margin", "difficulty": "minus the margin",
                 "bins": {"low": [-1.0, -0.999997], "high": [-0.999997, -0.5],
                          "count": [5, 5], "mismatches": [0, 1], "rate": [0.0, 0.2]}}
    unit, spans = difficulty_labels(long_tail)
    assert unit.startswith("reference margin") and spans == ["0.999997–1", "0.5–0.999997"]
    md = to_markdown({"fidelity": {"long_tail": {**long_tail, "spearman": 0.3}}})
    assert "| 1 | 0.999997–1 | 5 | 0 | 0.00% |" in md and "| -1" not in md


def _figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    drawn: list[Any] = []
    monkeypatch.setattr(plots, "_png", lambda fig: drawn.append(fig) or b"")
    return drawn


def test_plots_of_no_flips_say_so_and_rates_are_in_percent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    logits = torch.randn(40, 4)
    same = disagreement_sections(logits, logits, None)
    drawn = _figures(monkeypatch)
    plots.long_tail_plot(same["long_tail"])
    plots.matrix_plot([[10, 0], [0, 30]])
    plots.class_plot([{"class": 0, "agreement": 1.0}], same["class_churn"], 1.0)
    for fig in drawn:
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert any(t.startswith("no flips") for t in texts)
    flips = disagreement_sections(logits, logits.flip(1), None)["long_tail"]
    drawn.clear()
    plots.long_tail_plot(flips)
    (ax,) = drawn[0].axes
    fig_texts = [t.get_text() for t in ax.texts]
    assert not any(t.startswith("no flips") for t in fig_texts)
    ticks = [ax.yaxis.get_major_formatter()(v, 0) for v in (0.0, 50.0, 100.0)]
    assert ticks == ["0%", "50%", "100%"]  # the axis is in percent and says so
    assert ax.get_ylabel() == "inputs whose prediction flipped (%)"


def test_warnings_are_a_banner_in_html_and_a_panel_in_the_terminal() -> None:
    report = {"warnings": ["SUSPICIOUS REFERENCE: its accuracy is 10.2%"],
              "reference": {"accuracy": 0.102}, "compressed": {"accuracy": 0.1}}
    assert '<div class="warning">⚠ SUSPICIOUS REFERENCE: its accuracy is 10.2%</div>' in \
        to_html(report, plots={})
    buffer = io.StringIO()
    from rich.console import Console

    print_table(report, Console(file=buffer, width=120))
    out = buffer.getvalue()
    assert out.index("SUSPICIOUS REFERENCE") < out.index("top-1 accuracy")


def test_long_per_layer_step_tables_are_summarised() -> None:
    from netpress.report.rows import step_details

    bits = {f"layer{i}": 8 for i in range(37)}
    step = {"step": "WeightOnly", "layers": 37, "bits": bits}
    assert step_details(step) == "layers=37, bits={37 entries: 8 ×37}"
    assert step_details({"step": "x", "bits": {"a": 4, "b": 8}}) == "bits={'a': 4, 'b': 8}"
    report = {"steps": [step]}
    assert "bits={37 entries: 8 ×37}" in to_markdown(report)
    assert "layer36" not in to_html(report, plots={})


def test_a_user_tasks_numbers_get_rows() -> None:
    def score(ref: torch.Tensor, cmp: torch.Tensor, labels: Any) -> dict[str, Any]:
        return {"agreement": 0.5, "my_score": 1.25, "note": "text is not a row"}

    model = nn.Linear(4, 2)
    report = compare(model, model, data=[(torch.randn(4, 4), None)], task=score,
                     latency_batch_sizes=())
    table = {row[0]: row[1:] for row in rows(report)}
    assert table["agreement"] == ("", "50.00%", "") and table["my score"] == ("", "1.25", "")
    assert "note" not in table and "my score" in to_markdown(report)


def test_text_task_headlines_pair_reference_and_compressed() -> None:
    report = {"task": "language_model", "fidelity": {"n": 10},
              "headline": {"perplexity_reference": 20.5, "perplexity_compressed": 21.25,
                           "agreement": 0.9, "kl_mean": 0.0125}}
    table = {row[0]: row[1:] for row in rows(report)}
    assert table["perplexity"] == ("20.5", "21.25", "")
    assert table["agreement"] == ("", "90.00%", "") and table["kl mean"] == ("", "0.0125", "")
    encoder = {"task": "sentence_embedding",
               "fidelity": {"cosine_mean": 0.98, "cosine_min": 0.9, "agreement": 0.95},
               "headline": {"cosine_mean": 0.98, "cosine_min": 0.9,
                            "retrieval_agreement": 0.95}}
    table = {row[0]: row[1:] for row in rows(encoder)}
    assert table["cosine similarity to reference, mean"][1] == "0.9800"
    assert table["cosine min"] == ("", "0.9", "")
    assert table["retrieval agreement"] == ("", "95.00%", "")
