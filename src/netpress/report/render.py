"""Rendering a report dict: headline numbers, markdown, and a rich terminal table."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_MARKDOWN_FLIPS", "headline", "rows", "to_markdown", "print_table"]

#: ``report.md`` lists at most this many flipped inputs (``report.json`` keeps more).
MAX_MARKDOWN_FLIPS = 50


def _get(d: Mapping[str, Any], path: str) -> Any:
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _pct(x: Any) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _num(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, int) and abs(x) >= 10_000:
        return f"{x:,}"
    return str(x)


def _ms(x: Any) -> str:
    return "—" if x is None else f"{x:.3f} ms"


def _ratio(a: Any, b: Any) -> str:
    if not a or not b:
        return ""
    return f"{a / b:.2f}×"


def headline(r: Mapping[str, Any]) -> dict[str, Any]:
    """The few numbers a person looks at first."""
    keys = ("reference.accuracy", "compressed.accuracy", "agreement",
            "fidelity.mismatches_on_reference_correct", "fidelity.worst_class_agreement",
            "size.reference_bytes", "size.compressed_bytes", "macs.reference",
            "macs.compressed", "latency.reference_ms", "latency.compressed_ms")
    return {k: _get(r, k) for k in keys if _get(r, k) is not None}


def rows(r: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(metric, reference, compressed, change)`` rows for the summary table."""
    g = lambda p: _get(r, p)  # noqa: E731
    out: list[tuple[str, str, str, str]] = []
    ra, ca = g("reference.accuracy"), g("compressed.accuracy")
    if ra is not None or ca is not None:
        delta = "" if ra is None or ca is None else f"{100 * (ca - ra):+.2f} pts"
        out.append(("top-1 accuracy", _pct(ra), _pct(ca), delta))
    if g("agreement") is not None:
        out.append(("agreement with reference", "100.00%", _pct(g("agreement")), ""))
    n = g("fidelity.n")
    if g("fidelity.mismatches") is not None:
        out.append(("mismatches", "0", f"{g('fidelity.mismatches')} of {n}", ""))
    if g("fidelity.mismatches_on_reference_correct") is not None:
        out.append(("  … where reference was right", "0",
                    str(g("fidelity.mismatches_on_reference_correct")), ""))
    if g("fidelity.worst_class_agreement") is not None:
        out.append(("worst per-class agreement", "100.00%",
                    _pct(g("fidelity.worst_class_agreement")), ""))
    if g("fidelity.kl_mean") is not None:
        out.append(("mean KL(ref ‖ compressed)", "0", f"{g('fidelity.kl_mean'):.4g}", ""))
    rp, cp = g("reference.params"), g("compressed.params")
    if rp is not None:
        out.append(("parameters", _num(rp), _num(cp), ""))
        rn, cn = g("reference.nonzero_params"), g("compressed.nonzero_params")
        out.append(("non-zero parameters", _num(rn), _num(cn), _ratio(rn, cn) + " fewer"))
    rb, cb = g("size.reference_bytes"), g("size.compressed_bytes")
    if rb is not None:
        out.append(("size on disk (bytes)", _num(rb), _num(cb), _ratio(rb, cb) + " smaller"))
    rm, cm = g("macs.reference"), g("macs.compressed")
    if rm is not None:
        out.append(("MACs (dense)", _num(rm), _num(cm), _ratio(rm, cm) + " fewer"))
        if g("macs.compressed_sparse") is not None:
            out.append(("MACs (non-zero weights)", _num(rm), _num(g("macs.compressed_sparse")),
                        _ratio(rm, g("macs.compressed_sparse")) + " fewer"))
    if g("latency.reference_ms") is not None:
        threads = g("latency.threads")
        out.append((f"latency, batch 1, {threads} thread(s)", _ms(g("latency.reference_ms")),
                    _ms(g("latency.compressed_ms")),
                    _ratio(g("latency.reference_ms"), g("latency.compressed_ms")) + " speed"))
        bs = g("latency.batch_size")
        if bs and bs != 1 and g("latency.reference_batch_ms") is not None:
            out.append((f"latency, batch {bs}", _ms(g("latency.reference_batch_ms")),
                        _ms(g("latency.compressed_batch_ms")),
                        _ratio(g("latency.reference_batch_ms"),
                               g("latency.compressed_batch_ms")) + " speed"))
    return out


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def to_markdown(r: Mapping[str, Any]) -> str:
    """A readable markdown report: summary, per-class fidelity, steps and recipe."""
    lines = ["# netpress compression report", ""]
    lines += _md_table(["metric", "reference", "compressed", "change"],
                       [list(row) for row in rows(r)])
    per_class = _get(r, "fidelity.per_class")
    if per_class:
        lines += ["", "## Per-class fidelity", ""]
        body = [[str(c.get("class")), str(c.get("support")), _pct(c.get("agreement")),
                 _pct(c.get("reference_accuracy")), _pct(c.get("compressed_accuracy"))]
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
            info = {k: v for k, v in s.items() if k not in ("step", "per_layer_sparsity")}
            detail = ", ".join(f"{k}={v}" for k, v in info.items())
            lines.append(f"- **{s.get('step')}**: {detail}")
    if r.get("recipe"):
        lines += ["", "## Recipe", "", "```json", json.dumps(r["recipe"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def _md_disagreement(r: Mapping[str, Any]) -> list[str]:
    """Markdown for the long-tail, confidence-shift and flipped-input sections."""
    lines: list[str] = []
    lt = _get(r, "fidelity.long_tail")
    if lt:
        rho = lt.get("spearman")
        bins = lt["bins"]
        lines += ["", "## Long tail: mismatches vs difficulty", "",
                  f"Difficulty proxy: **{lt.get('proxy')}** ({lt.get('difficulty')}); "
                  f"Spearman ρ(difficulty, flipped) = "
                  f"**{'n/a' if rho is None else f'{rho:+.3f}'}**.", ""]
        body = [[str(i + 1), f"{lo:.4g} … {hi:.4g}", str(n), str(k), _pct(rate)]
                for i, (lo, hi, n, k, rate) in enumerate(zip(
                    bins["low"], bins["high"], bins["count"], bins["mismatches"],
                    bins["rate"]))]
        lines += _md_table(["bin (easiest first)", "difficulty", "inputs", "flipped",
                            "mismatch rate"], body)
    shift = _get(r, "fidelity.confidence_shift")
    if shift:
        lines += ["", "## Confidence shift", "",
                  "Change in the probability of the reference's top-1 class "
                  "(compressed minus reference).", ""]
        lines += _md_table(["mean", "mean abs", "p05", "median", "p95", "less confident"],
                           [[f"{shift['mean']:+.4f}", f"{shift['mean_abs']:.4f}",
                             f"{shift['p05']:+.4f}", f"{shift['median']:+.4f}",
                             f"{shift['p95']:+.4f}", _pct(shift["share_decreased"])]])
    flipped = _get(r, "fidelity.flipped")
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


def print_table(r: Mapping[str, Any], console: Any = None) -> None:
    """Print the summary as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="netpress: reference vs compressed", title_justify="left")
    for col, justify in (("metric", "left"), ("reference", "right"), ("compressed", "right"),
                         ("change", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in rows(r):
        table.add_row(*row)
    (console or Console()).print(table)
