"""`orchestrate runs compare A B`: what changed between two runs (the pick, and each shared candidate).
"""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table

from orchestrator.cli.console import candidate_label, out_console
from orchestrator.cli.format import cell
from orchestrator.metrics import COMPARE, shown_in
from orchestrator.metrics import metric as metric_row
from orchestrator.search.selection import metric_value
from orchestrator.state.store import DAMAGED

#: The metrics compared: the table of metrics' COMPARE rows (orchestrator/metrics.py).
METRICS = tuple(m.name for m in shown_in(COMPARE))


def signature(candidate: dict[str, Any]) -> str:
    """Candidates are the same across runs when their pipelines (techniques and parameters) are.

    A damaged record (its pipeline unknown) is the same as no other candidate."""
    if candidate.get("status") == DAMAGED:
        return f"{DAMAGED}:{id(candidate)}"
    return json.dumps(candidate["pipeline"], sort_keys=True)


def compare_runs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """A structured diff of two stored runs (as RunStore.get_run returns them)."""
    best = {r["id"]: next((c for c in r["candidates"] if c["id"] == r["best_id"]), None) for r in (a, b)}
    by_sig_a = {signature(c): c for c in a["candidates"]}
    by_sig_b = {signature(c): c for c in b["candidates"]}
    shared = []
    for sig in by_sig_a.keys() & by_sig_b.keys():
        ca, cb = by_sig_a[sig], by_sig_b[sig]
        row = {"pipeline": candidate_label(ca), "params": ca["pipeline"], "a": ca["id"], "b": cb["id"], "metrics": {}}
        for metric in METRICS:
            va, vb = metric_value(ca, metric), metric_value(cb, metric)
            change = None if va in (None, 0) or vb is None else (vb - va) / va
            row["metrics"][metric] = {"a": va, "b": vb, "relative_change": change}
        row["feasible"] = {"a": ca.get("feasible"), "b": cb.get("feasible")}
        shared.append(row)
    return {
        "a": {k: a[k] for k in ("id", "profile", "task", "status", "best_id")},
        "b": {k: b[k] for k in ("id", "profile", "task", "status", "best_id")},
        "same_pick": bool(best[a["id"]] and best[b["id"]] and signature(best[a["id"]]) == signature(best[b["id"]])),
        "best": {"a": best[a["id"]], "b": best[b["id"]]},
        "shared": sorted(shared, key=lambda r: r["a"]),
        "only_in_a": [c["id"] for s, c in by_sig_a.items() if s not in by_sig_b],
        "only_in_b": [c["id"] for s, c in by_sig_b.items() if s not in by_sig_a],
        "damaged": {"a": a.get("damaged") or [], "b": b.get("damaged") or []},
    }


def print_comparison(diff: dict[str, Any]) -> None:
    """The comparison as text and a table."""
    console = out_console()  # labels and ids come from plugins and stored runs: escaped (`cell`)
    a, b = diff["a"], diff["b"]
    console.print(cell(f"A {a['id']} ({a['profile']}, {a['task']}, {a['status']})  vs  "
                       f"B {b['id']} ({b['profile']}, {b['task']}, {b['status']})"), highlight=False)
    for side in ("a", "b"):
        pick = diff["best"][side]
        console.print(cell(f"  pick {side.upper()}: " + (f"{pick['id']} {candidate_label(pick)}" if pick else "none")),
                      highlight=False)
    console.print("  same pick" if diff["same_pick"] else "  the pick changed", highlight=False)
    for side in ("a", "b"):  # what of a stored run cannot be read: said, and left out of the comparison
        for what in (diff.get("damaged") or {}).get(side, []):
            console.print(cell(f"  damaged in run {side.upper()} {diff[side]['id']}: {what}"), highlight=False)
    rows = [metric_row(name) for name in METRICS]
    picks = [c for c in diff["best"].values() if c]  # a pick's estimated energy marks the column
    tags = {m.name: sorted({m.tag(c.get("metrics")) for c in picks} - {None}) for m in rows}
    names = [m.column("report") + "".join(f" ({t})" for t in tags[m.name]) for m in rows]
    table = Table("A", "B", "pipeline", *(f"{n} A→B" for n in names), "feasible A→B")
    for row in diff["shared"]:
        cells = []
        for metric in rows:
            m = row["metrics"][metric.name]
            if m["a"] is None or m["b"] is None:
                cells.append("-")
                continue
            change = f" ({m['relative_change']:+.1%})" if m["relative_change"] is not None else ""
            cells.append(f"{metric.format(m['a'])}→{metric.format(m['b'])}{change}")
        feas = row["feasible"]
        table.add_row(cell(row["a"]), cell(row["b"]), cell(row["pipeline"]), *cells, f"{feas['a']}→{feas['b']}")
    console.print(table)
    if diff["only_in_a"] or diff["only_in_b"]:
        console.print(cell(f"only in A: {', '.join(diff['only_in_a']) or '-'}; "
                           f"only in B: {', '.join(diff['only_in_b']) or '-'}"), highlight=False)
