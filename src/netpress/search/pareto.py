"""The Pareto front of objective against constraint metric: pure maths, a table, a plot.

A trial is on the front when no other fully evaluated trial is at least as good in both
the objective (lower is better) and the first constraint's slack (higher is better) and
strictly better in one. Trials stopped early have only an estimate from a few inputs and are
left out of the front (the plot shows them apart).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["pareto_indices", "pareto_front", "pareto_table", "pareto_plot", "progress_plot"]


def pareto_indices(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when minimising ``x`` and maximising ``y``,
    sorted by ``x``."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best_y = float("-inf")
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def _point(t: Mapping[str, Any]) -> tuple[float, float] | None:
    o = t.get("outcome") or {}
    if o.get("objective") is None or o.get("early_stopped") or o.get("error") \
            or not o.get("constraints"):
        return None
    return float(o["objective"]), float(o["constraints"][0]["slack"])


def pareto_front(trials: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The trial records on the front (see the module docs), by objective."""
    kept = [(t, p) for t in trials if (p := _point(t)) is not None]
    idx = pareto_indices([p for _, p in kept])
    return [kept[i][0] for i in idx]


def pareto_table(front: Sequence[Mapping[str, Any]], objective: str, unit: str) -> str:
    """A markdown table of the front: trial, objective, every constraint metric, feasible."""
    if not front:
        return "(no fully evaluated trial)"
    names = [c["name"] for c in front[0]["outcome"]["constraints"]]
    lines = ["| trial | " + f"{objective} ({unit}) | " + " | ".join(names) + " | feasible |",
             "|---" * (3 + len(names)) + "|"]
    for t in front:
        o = t["outcome"]
        vals = " | ".join(f"{c['value']:.4f}" for c in o["constraints"])
        lines.append(f"| {t['number']} | {o['objective']:,.0f} | {vals} | "
                     f"{'yes' if o['feasible'] else 'no'} |")
    return "\n".join(lines)


def _style() -> Any:
    from netpress.report.plots import _STYLE

    return _STYLE


def pareto_plot(trials: Sequence[Mapping[str, Any]], objective: str, unit: str,
                title: str = "Search: objective vs constraint") -> bytes:
    """PNG: every trial (feasible, infeasible, stopped early), the front and the bound."""
    import matplotlib
    from matplotlib.figure import Figure

    from netpress.report.plots import _png

    with matplotlib.rc_context(_style()):
        fig = Figure(figsize=(6.4, 4.4), dpi=110, layout="constrained")
        ax = fig.add_subplot()
        groups: dict[str, list[tuple[float, float]]] = {"feasible": [], "infeasible": [],
                                                         "stopped early (estimate)": []}
        cname, bound = None, None
        for t in trials:
            o = t.get("outcome") or {}
            if o.get("objective") is None or not o.get("constraints"):
                continue
            c = o["constraints"][0]
            cname, bound = c["name"], c["bound"]
            key = "feasible" if o["feasible"] else (
                "stopped early (estimate)" if o["early_stopped"] else "infeasible")
            groups[key].append((o["objective"], c["value"]))
        styles = {"feasible": ("#1b9e77", "o"), "infeasible": ("#d95f02", "x"),
                  "stopped early (estimate)": ("#999999", "v")}
        for key, pts in groups.items():
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=key,
                           color=styles[key][0], marker=styles[key][1], s=28)
        front = pareto_front(trials)
        if front:
            xs = [t["outcome"]["objective"] for t in front]
            ys = [t["outcome"]["constraints"][0]["value"] for t in front]
            ax.step(xs, ys, where="post", color="#1f77b4", lw=1.5, label="Pareto front")
        if bound is not None:
            ax.axhline(bound, color="#555555", ls="--", lw=1, label=f"bound {bound:g}")
        ax.set_xlabel(f"{objective} ({unit})")
        ax.set_ylabel(cname or "constraint metric")
        ax.set_title(title)
        ax.legend(loc="best")
        return _png(fig)


def progress_plot(curves: Mapping[str, Sequence[float | None]], objective: str, unit: str,
                  *, reference: float | None = None,
                  title: str = "Best feasible objective per trial") -> bytes:
    """PNG: one line per run (label -> best feasible objective after each trial)."""
    import matplotlib
    from matplotlib.figure import Figure

    from netpress.report.plots import _png

    with matplotlib.rc_context(_style()):
        fig = Figure(figsize=(7.0, 4.6), dpi=110, layout="constrained")
        ax = fig.add_subplot()
        colors = {"gp": "#1f77b4", "tpe": "#d95f02", "random": "#7570b3",
                  "knapsack": "#1b9e77", "gp+knapsack": "#e7298a"}
        for label, ys in curves.items():
            base = label.split(" ")[0]
            xs = [i + 1 for i, y in enumerate(ys) if y is not None]
            ax.plot(xs, [y for y in ys if y is not None], marker=".", lw=1.2, alpha=0.85,
                    color=colors.get(base), label=label)
        if reference is not None:
            ax.axhline(reference, color="#555555", ls="--", lw=1, label="reference optimum")
            ax.axhline(reference * 1.05, color="#555555", ls=":", lw=1, label="+5%")
        ax.set_xlabel("trial")
        ax.set_ylabel(f"best feasible {objective} ({unit})")
        ax.set_title(title)
        ax.legend(loc="best", fontsize=8, ncol=2)
        return _png(fig)
