"""The report's plots, drawn from the report dict with matplotlib (Agg), as PNG bytes.

matplotlib is imported inside the functions that draw (``import netpress`` stays lean) and
no pyplot global state is used: every plot builds its own ``Figure``. Fonts are 10 pt or
larger, every axis is labelled and every plot has a title. Each function takes the part of
``report.json`` it draws; :func:`report_plots` draws everything the report holds.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from netpress.report.rows import difficulty_labels

__all__ = [
    "MAX_BAR_CLASSES",
    "MAX_ANNOTATED_CLASSES",
    "class_plot",
    "confidence_plot",
    "cosine_plot",
    "have_matplotlib",
    "long_tail_plot",
    "matrix_plot",
    "report_plots",
]

#: Above this many classes the per-class plot shows only the classes with lowest agreement.
MAX_BAR_CLASSES = 40
#: Up to this many classes the prediction matrix has its counts written in the cells.
MAX_ANNOTATED_CLASSES = 20

_STYLE: dict[str, Any] = {
    "font.size": 11, "axes.titlesize": 13, "axes.labelsize": 11, "xtick.labelsize": 10,
    "ytick.labelsize": 10, "legend.fontsize": 10, "axes.spines.top": False,
    "axes.spines.right": False,
}
_BLUE, _ORANGE, _GREEN, _GREY = "#1f77b4", "#d95f02", "#1b9e77", "#555555"


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (the ``report`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _style() -> Any:
    import matplotlib

    return matplotlib.rc_context(_STYLE)  # type: ignore[arg-type]


def class_plot(per_class: Sequence[Mapping[str, Any]],
               churn: Mapping[str, Sequence[int]] | None = None,
               agreement: float | None = None) -> bytes:
    """Per-class agreement (bars) and, with ``churn``, flips out of / into each class."""
    rows = [r for r in per_class if r.get("agreement") is not None]
    subset = len(rows) > MAX_BAR_CLASSES
    if subset:
        rows = sorted(rows, key=lambda r: (r["agreement"], r["class"]))[:MAX_BAR_CLASSES]
    names = [str(r["class"]) for r in rows]
    values = [100 * r["agreement"] for r in rows]
    with _style():
        fig = _figure(9.5, 6.5 if churn else 4.2)
        axes = fig.subplots(2 if churn else 1, 1, squeeze=False)[:, 0]
        ax = axes[0]
        x = list(range(len(rows)))
        ax.bar(x, values, color=_BLUE, label="agreement")
        low = min(values, default=100.0)
        ax.set_ylim(max(0.0, low - max(2.0, 0.15 * (100 - low))), 100.5)
        if agreement is not None:
            ax.axhline(100 * agreement, color=_GREY, ls="--", lw=1.2,
                       label=f"overall agreement {100 * agreement:.2f}%")
            ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
        ax.set_xticks(x, names, rotation=90 if len(rows) > 20 else 0)
        ax.set_xlabel("class (true label)")
        ax.set_ylabel("agreement with reference (%)")
        title = "Per-class agreement"
        ax.set_title(title + (f" ({len(rows)} lowest classes)" if subset else ""),
                     pad=30 if agreement is not None else 6)
        if churn:
            _churn_axes(axes[1], churn, [int(r["class"]) for r in rows] if subset else None)
        return _png(fig)


def _churn_axes(ax: Any, churn: Mapping[str, Sequence[int]], only: list[int] | None) -> None:
    from matplotlib.ticker import MaxNLocator

    classes = only if only is not None else list(range(len(churn["flips_out"])))
    x = list(range(len(classes)))
    out = [churn["flips_out"][c] for c in classes]
    into = [churn["flips_in"][c] for c in classes]
    ax.bar([i - 0.2 for i in x], out, width=0.4, color=_ORANGE,
           label="flips out (reference said this class)")
    ax.bar([i + 0.2 for i in x], into, width=0.4, color=_GREEN,
           label="flips in (compressed says this class)")
    ax.set_xticks(x, [str(c) for c in classes], rotation=90 if len(classes) > 20 else 0)
    ax.set_xlabel("class (predicted)")
    ax.set_ylabel("flipped inputs")
    ax.set_title("Per-class churn: predictions that moved", pad=30)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if max(out + into, default=0) == 0:
        ax.set_ylim(0, 1)
        _no_flips(ax)


def matrix_plot(matrix: Sequence[Sequence[int]]) -> bytes:
    """The reference→compressed prediction matrix as a heat map.

    Agreeing inputs (the diagonal) are grey; flips (off-diagonal cells) are coloured on a
    log scale so that single flips show; zero cells are white. Counts are written in the
    cells up to :data:`MAX_ANNOTATED_CLASSES` classes.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, LogNorm

    counts = np.asarray(matrix, dtype=float)
    c = counts.shape[0]
    diagonal = np.eye(c, dtype=bool)
    flips = np.ma.masked_where(diagonal | (counts == 0), counts)
    agree = np.ma.masked_where(~diagonal | (counts == 0), np.ones_like(counts))
    top = max(float(flips.max()) if flips.count() else 1.0, 2.0)
    with _style():
        side = 6.5 if c <= MAX_ANNOTATED_CLASSES else 8.0
        fig = _figure(side + 1.3, side)
        ax = fig.subplots()
        ax.imshow(agree, cmap=ListedColormap(["#d9dde3"]), interpolation="nearest")
        reds = ListedColormap(colormaps["OrRd"](np.linspace(0.35, 1.0, 256)))
        image = ax.imshow(flips, cmap=reds, norm=LogNorm(vmin=1.0, vmax=top),
                          interpolation="nearest")
        bar = fig.colorbar(image, ax=ax, label="flipped inputs (log scale)", shrink=0.85)
        ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000)
                 if t <= top]
        bar.set_ticks(ticks, labels=[str(t) for t in ticks])
        bar.minorticks_off()
        ax.set_xlabel("compressed prediction")
        ax.set_ylabel("reference prediction")
        off = int(counts.sum() - np.trace(counts))
        ax.set_title(f"Prediction matrix: {off} flips (grey = agreeing)")
        if off == 0:
            _no_flips(ax)
        if c <= MAX_ANNOTATED_CLASSES:
            ticks = list(range(c))
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_yticks(ticks, [str(t) for t in ticks])
            size = 10 if c <= 12 else 8.5 if c <= 16 else 7.5
            for i, j in zip(*np.nonzero(counts)):
                strong = not diagonal[i, j] and np.log(counts[i, j]) > 0.5 * np.log(top)
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center",
                        fontsize=size, color="white" if strong else "black")
        else:
            ax.set_xlim(-0.5, c - 0.5)
            ax.set_ylim(c - 0.5, -0.5)
        return _png(fig)


def _histogram_figure(edges: Sequence[float], counts: Sequence[int]) -> tuple[Any, Any]:
    """A figure with one axes holding the bars of a histogram (``edges``: bins + 1)."""
    fig = _figure(9.0, 4.2)
    ax = fig.subplots()
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color=_BLUE, edgecolor="white",
           linewidth=0.5)
    return fig, ax


def confidence_plot(shift: Mapping[str, Any]) -> bytes:
    """Histogram of the change in probability of the reference's top-1 class."""
    edges = list(shift["histogram"]["edges"])
    counts = list(shift["histogram"]["counts"])
    with _style():
        fig, ax = _histogram_figure(edges, counts)
        nonzero = [v for v in counts if v > 0]
        if nonzero and max(nonzero) / min(nonzero) > 100:
            ax.set_yscale("log")
        ax.axvline(0.0, color=_GREY, lw=1)
        ax.axvline(float(shift["mean"]), color=_ORANGE, ls="--", lw=1.5,
                   label=f"mean {shift['mean']:+.4f}")
        ax.legend(loc="upper left")
        ax.set_xlabel("p_compressed − p_reference of the reference's top-1 class")
        ax.set_ylabel("inputs")
        ax.set_title(f"Confidence shift ({100 * shift['share_decreased']:.1f}% of inputs "
                     f"less confident)")
        return _png(fig)


def _no_flips(ax: Any, text: str = "no flips: every input kept its top-1 prediction") -> None:
    """Write ``text`` in the middle of an axes that would otherwise be empty."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=13,
            color=_GREY, bbox={"boxstyle": "round", "fc": "white", "ec": "#d8dee5"})


def long_tail_plot(long_tail: Mapping[str, Any]) -> bytes:
    """Mismatch rate per difficulty-quantile bin, easiest first, Spearman ρ in the title.

    The y axis is in percent (tick labels carry the % sign); with no flips at all the axes
    say so instead of showing empty bars.
    """
    from matplotlib.ticker import PercentFormatter

    bins = long_tail["bins"]
    rates = [100 * r for r in bins["rate"]]
    proxy = str(long_tail.get("proxy", "difficulty"))
    rho = long_tail.get("spearman")
    rho_text = "n/a" if rho is None else f"{rho:+.3f}"
    unit, spans = difficulty_labels(long_tail)
    with _style():
        fig = _figure(9.5, 4.6)
        ax = fig.subplots()
        x = list(range(len(rates)))
        ax.bar(x, rates, color=_ORANGE)
        for i, (hits, n) in enumerate(zip(bins["mismatches"], bins["count"])):
            ax.annotate(f"{hits}/{n}", (i, rates[i]), xytext=(0, 3),
                        textcoords="offset points", ha="center", fontsize=10)
        top = max(rates, default=0.0)
        ax.set_ylim(0, top * 1.2 if top > 0 else 1.0)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=None))
        ax.set_xticks(x, spans, rotation=30, ha="right")
        ax.set_xlabel(f"difficulty bin, easiest → hardest: {unit}")
        ax.set_ylabel("inputs whose prediction flipped (%)")
        ax.set_title(f"Mismatches vs difficulty ({proxy}): Spearman ρ = {rho_text}")
        if sum(bins["mismatches"]) == 0:
            _no_flips(ax)
        return _png(fig)


def cosine_plot(fidelity: Mapping[str, Any]) -> bytes:
    """Histogram of an embedding task's row cosines with the task's threshold marked."""
    dist = fidelity["cosine"]
    hist = dist["histogram"]
    edges, counts = list(hist["edges"]), list(hist["counts"])
    threshold = float(fidelity.get("threshold", 0.99))
    share = fidelity.get("agreement")
    with _style():
        fig, ax = _histogram_figure(edges, counts)
        label = f"threshold {threshold:g}"
        if share is not None:
            label += f": {100 * share:.2f}% of rows at or above"
        if threshold >= edges[0]:
            ax.axvline(threshold, color=_ORANGE, ls="--", lw=1.5, label=label)
        else:  # below the axis: every row shown is above it
            ax.plot([], [], color=_ORANGE, ls="--", label=f"{label} (left of the axis)")
        ax.legend(loc="best")
        below = hist.get("below", 0)
        ax.set_xlabel("cosine similarity to the reference's output row"
                      + (f" ({below} rows below {edges[0]:.4g} not shown)" if below else ""))
        ax.set_ylabel("output rows")
        median = dist["quantiles"]["median"]
        ax.set_title(f"Cosine similarity to the reference (median {median:.4f})")
        return _png(fig)


def report_plots(report: Mapping[str, Any]) -> dict[str, bytes]:
    """Every plot the report has data for, keyed ``classes``, ``matrix``, ``confidence``,
    ``long_tail``, ``cosine``; empty when matplotlib is missing or the report has no
    fidelity section."""
    fid = report.get("fidelity")
    if not isinstance(fid, Mapping) or not have_matplotlib():
        return {}
    out: dict[str, bytes] = {}
    if fid.get("per_class"):
        out["classes"] = class_plot(fid["per_class"], fid.get("class_churn"),
                                    fid.get("agreement"))
    if fid.get("prediction_matrix"):
        out["matrix"] = matrix_plot(fid["prediction_matrix"])
    if fid.get("confidence_shift"):
        out["confidence"] = confidence_plot(fid["confidence_shift"])
    if fid.get("long_tail"):
        out["long_tail"] = long_tail_plot(fid["long_tail"])
    if isinstance(fid.get("cosine"), Mapping):
        out["cosine"] = cosine_plot(fid)
    return out
