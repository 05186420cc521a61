"""Rendering a report dict: headline numbers, markdown, and a rich terminal table."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from netpress.report.rows import difficulty_labels, get, notes, pct, rows, step_details

__all__ = ["MAX_MARKDOWN_FLIPS", "headline", "rows", "to_markdown", "print_table"]

#: ``report.md`` lists at most this many flipped inputs (``report.json`` keeps more).
MAX_MARKDOWN_FLIPS = 50


def headline(r: Mapping[str, Any]) -> dict[str, Any]:
    """The few numbers a person looks at first."""
    keys = ("reference.accuracy", "compressed.accuracy", "agreement",
            "fidelity.mismatches_on_reference_correct", "fidelity.worst_class_agreement",
            "fidelity.cosine_mean", "onnx.fidelity.agreement",
            "size.reference_bytes", "size.compressed_bytes", "macs.reference",
            "macs.compressed", "latency.reference_ms", "latency.compressed_ms")
    return {k: get(r, k) for k in keys if get(r, k) is not None}


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def to_markdown(r: Mapping[str, Any]) -> str:
    """A readable markdown report: summary, per-class fidelity, steps and recipe."""
    lines = ["# netpress compression report", ""]
    for warning in r.get("warnings") or []:
        lines += [f"> **Warning:** {warning}", ""]
    lines += _md_table(["metric", "reference", "compressed", "change"],
                       [list(row) for row in rows(r)])
    lines += [""] + [f"- {note}" for note in notes(r)] if notes(r) else []
    lines += _md_cosine(r)
    per_class = get(r, "fidelity.per_class")
    if per_class:
        lines += ["", "## Per-class fidelity", ""]
        body = [[str(c.get("class")), str(c.get("support")), pct(c.get("agreement")),
                 pct(c.get("reference_accuracy")), pct(c.get("compressed_accuracy"))]
                for c in per_class]
        lines += _md_table(["class", "support", "agreement", "ref. accuracy",
                            "comp. accuracy"], body)
    lines += _md_disagreement(r)
    from netpress.report._toolbox import toolbox_markdown  # split/activations/robustness

    lines += toolbox_markdown(r)
    steps = r.get("steps") or []
    if steps:
        lines += ["", "## Steps", ""]
        for s in steps:
            detail = step_details(s)
            lines.append(f"- **{s.get('step')}**: {detail}")
    if r.get("recipe"):
        lines += ["", "## Recipe", "", "```json", json.dumps(r["recipe"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def _md_disagreement(r: Mapping[str, Any]) -> list[str]:
    """Markdown for the long-tail, confidence-shift and flipped-input sections."""
    lines: list[str] = []
    lt = get(r, "fidelity.long_tail")
    if lt:
        rho = lt.get("spearman")
        bins = lt["bins"]
        unit, spans = difficulty_labels(lt)
        lines += ["", "## Long tail: mismatches vs difficulty", "",
                  f"Difficulty proxy: **{lt.get('proxy')}** ({lt.get('difficulty')}); "
                  f"Spearman ρ(difficulty, flipped) = "
                  f"**{'n/a' if rho is None else f'{rho:+.3f}'}**.", ""]
        body = [[str(i + 1), span, str(n), str(k), pct(rate)]
                for i, (span, n, k, rate) in enumerate(zip(
                    spans, bins["count"], bins["mismatches"], bins["rate"]))]
        lines += _md_table(["bin (easiest first)", unit, "inputs", "flipped",
                            "mismatch rate"], body)
    shift = get(r, "fidelity.confidence_shift")
    if shift:
        lines += ["", "## Confidence shift", "",
                  "Change in the probability of the reference's top-1 class "
                  "(compressed minus reference).", ""]
        lines += _md_table(["mean", "mean abs", "p05", "median", "p95", "less confident"],
                           [[f"{shift['mean']:+.4f}", f"{shift['mean_abs']:.4f}",
                             f"{shift['p05']:+.4f}", f"{shift['median']:+.4f}",
                             f"{shift['p95']:+.4f}", pct(shift["share_decreased"])]])
    flipped = get(r, "fidelity.flipped")
    if flipped and flipped.get("count"):
        idx = flipped["indices"][:MAX_MARKDOWN_FLIPS]
        labels = flipped.get("labels") or [None] * len(idx)
        shown = ", ".join(
            f"{i} ({'' if y is None else f'label {y}: '}{a}→{b})"
            for i, a, b, y in zip(idx, flipped["reference_pred"], flipped["compressed_pred"],
                                  labels))
        more = "" if len(idx) == flipped["count"] else f" (first {len(idx)} listed)"
        lines += ["", f"## Flipped inputs: {flipped['count']}{more}", "",
                  "Index in the evaluation data (reference → compressed prediction):", "",
                  shown]
    return lines


def _md_cosine(r: Mapping[str, Any]) -> list[str]:
    """Markdown for an embedding task's cosine distribution."""
    dist = get(r, "fidelity.cosine")
    if not isinstance(dist, Mapping):
        return []
    q = dist["quantiles"]
    keys = ("min", "p01", "p05", "p25", "median", "p75", "max")
    lines = ["", "## Cosine similarity to the reference", "",
             f"Over {get(r, 'fidelity.n')} output rows (one per input, or per token).", ""]
    lines += _md_table(list(keys), [[f"{q[k]:.5f}" for k in keys]])
    shares = dist["share_at_least"]
    lines += [""] + _md_table(["rows with cosine ≥", *shares],
                              [["share", *(pct(v) for v in shares.values())]])
    return lines


def print_table(r: Mapping[str, Any], console: Any = None) -> None:
    """Print the summary as a rich table, warnings above it and notes below."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    console = console or Console()
    for warning in r.get("warnings") or []:
        console.print(Panel(warning, title="warning", border_style="bold red",
                            style="bold red"))

    table = Table(title="netpress: reference vs compressed", title_justify="left")
    for col, justify in (("metric", "left"), ("reference", "right"), ("compressed", "right"),
                         ("change", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in rows(r):
        table.add_row(*row)
    console.print(table)
    for note in notes(r):
        console.print(f"[dim]{note}[/]")
