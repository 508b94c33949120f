"""Pareto plots for report.html, drawn with matplotlib as inline SVG (self-contained, no network)."""

from __future__ import annotations

import io
from typing import Any

from orchestrator.metrics import PLOT, Metric, shown_in
from orchestrator.metrics import metric as metric_row


def axes(objective: str | None = None) -> list[Metric]:
    """The x axes of the plots (accuracy is always the y axis): the table of metrics' PLOT rows
    (orchestrator/metrics.py), and the profile's `objective` metric where it is not one of them."""
    return shown_in(PLOT, objective)


def _x(candidate: dict[str, Any], metric: str) -> float | None:
    return metric_row(metric).shown_value(candidate.get("metrics"))


def pareto_svg(results: dict[str, Any], metric: str) -> str | None:
    """One scatter plot of accuracy against `metric` as an SVG string, or None when nothing has that metric.

    The axis says the metric's label and unit from the table. Point groups carry ids
    (`points-feasible`, `points-infeasible`, `points-front`, `points-baseline`, `points-pick`) so
    the page can be checked from a browser.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in results["candidates"] if c["status"] == "ok" and _x(c, metric) is not None]
    if not ok:
        return None
    device = results.get("device") or {}
    # an emulated device's latency: native-scaled since the selection rule (docs/emulation.md), else emulated
    emulated = (device.get("latency_source") or "emulated") if device.get("emulated") else None
    row = metric_row(metric)
    tags = sorted({row.tag(c["metrics"]) for c in ok} - {None})  # "estimated" energy
    notes = [*([emulated] if emulated and row.percentile is not None else []), *tags]
    xlabel = f"{row.label} ({row.unit})" + (f" — {', '.join(notes).upper()}" if notes else "")

    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=100)
    groups = [
        ("points-infeasible", [c for c in ok if not c.get("feasible")], dict(marker="x", color="#999999", s=30)),
        ("points-feasible", [c for c in ok if c.get("feasible")], dict(marker="o", color="#4c78a8", s=30)),
    ]
    for gid, members, style in groups:
        if members:
            sc = ax.scatter([_x(c, metric) for c in members], [c["metrics"]["accuracy"] for c in members],
                            label=gid.split("-")[1], **style)
            sc.set_gid(gid)
    front = sorted((c for c in ok if c.get("on_front")), key=lambda c: _x(c, metric))
    if front:
        (line,) = ax.plot([_x(c, metric) for c in front], [c["metrics"]["accuracy"] for c in front],
                          color="#f58518", marker="o", linewidth=1.2, label="Pareto front")
        line.set_gid("points-front")
    for gid, cand, style in (("points-baseline", results.get("baseline"), dict(marker="s", color="black", s=60)),
                             ("points-pick", results.get("best"), dict(marker="*", color="#2ca02c", s=220))):
        if cand and cand.get("status") == "ok" and _x(cand, metric) is not None:
            sc = ax.scatter([_x(cand, metric)], [cand["metrics"]["accuracy"]], zorder=5,
                            label=gid.split("-")[1], **style)
            sc.set_gid(gid)
    for c in ok:
        ax.annotate(c["id"], (_x(c, metric), c["metrics"]["accuracy"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points", color="#555555")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (held-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    if notes:
        ax.set_title(" and ".join(notes) + " values", fontsize=8, color="#b35c00")
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog and doctype: the SVG sits inline in HTML
