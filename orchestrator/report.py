"""report.html: one self-contained page (no network) with every candidate, the front and the pick."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from orchestrator.selection import pipeline_label

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse;font-size:.9rem}th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th{background:#f2f2f2}td.l{text-align:left}tr.best{background:#e6f6e6}tr.failed{color:#999}
.tag{font-size:.75rem;padding:0 .3rem;border-radius:.2rem;background:#fde9c4;margin-left:.3rem}
.front{font-weight:bold}code{background:#f4f4f4;padding:0 .2rem}
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _row(c: dict[str, Any], best_id: str | None, front_ids: set[str], emulated: bool) -> str:
    m = c.get("metrics") or {}
    lat = m.get("latency_ms") or {}
    cls = "best" if c["id"] == best_id else ("failed" if c["status"] != "ok" else "")
    energy = _fmt(m.get("energy_mj"), 4)
    if m.get("energy_source") == "estimated":
        energy += '<span class="tag">estimated</span>'
    latency = _fmt(lat.get("p50"))
    if emulated and lat:
        latency += '<span class="tag">emulated</span>'
    notes = "; ".join(v["message"] for v in c.get("violations") or []) or (c.get("error") or "")
    params = "; ".join(f"{s['technique']}: {json.dumps(s['params'])}" for s in c["pipeline"]) or "exported unchanged"
    return (
        f'<tr class="{cls}"><td class="l{" front" if c["id"] in front_ids else ""}">{html.escape(c["id"])}</td>'
        f'<td class="l">{html.escape(pipeline_label(c))}</td><td class="l"><code>{html.escape(params)}</code></td>'
        f"<td>{_fmt(m.get('accuracy'), 4)}</td><td>{_fmt(m.get('accuracy_drop'), 2)}</td>"
        f"<td>{_fmt((m.get('size_bytes') or 0) / 1024, 1) if m.get('size_bytes') else '–'}</td>"
        f"<td>{latency}</td><td>{_fmt(lat.get('p90'))}</td><td>{_fmt(lat.get('p99'))}</td>"
        f"<td>{_fmt(m.get('peak_memory_mb'), 1)}</td><td>{energy}</td>"
        f"<td>{'yes' if c.get('feasible') else 'no'}</td><td class=\"l\">{html.escape(notes)}</td></tr>"
    )


def render_report(results: dict[str, Any]) -> str:
    """The report page as a string."""
    best = results.get("best")
    best_id = best["id"] if best else None
    front_ids = {c["id"] for c in results["candidates"] if c.get("on_front")}
    device = results.get("device") or {}
    emulated = bool(device.get("emulated"))
    rows = "\n".join(_row(c, best_id, front_ids, emulated) for c in results["candidates"])
    constraints = {k: v for k, v in (results.get("constraints") or {}).items() if v is not None}
    if best:
        pick = (f"<p>Picked <b>{html.escape(best['id'])}</b> ({html.escape(pipeline_label(best))}) by "
                f"{html.escape(results['objective']['metric'])} ({html.escape(results['objective']['goal'])}).</p>")
    else:
        pick = f"<p><b>No model picked</b> (run {html.escape(results['status'])}): {html.escape(results.get('message') or '')}</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edge-orchestrator run {html.escape(results['run_id'])}</title>
<style>{STYLE}</style></head><body>
<h1>Run {html.escape(results['run_id'])}</h1>
<p>Profile <b>{html.escape(results['profile'])}</b> (<code>{html.escape(results.get('profile_path', ''))}</code>),
task <b>{html.escape(results['task'])}</b>, device <b>{html.escape(str(device.get('name')))}</b>
({html.escape(str(device.get('transport')))}, {html.escape(str(device.get('arch')))}{', emulated' if emulated else ''}).
Status: <b>{html.escape(results['status'])}</b>.</p>
{pick}
<p>Constraints: <code>{html.escape(json.dumps(constraints))}</code>. Bold ids are on the Pareto front of the
feasible candidates (accuracy up; latency p50, size and energy down). Energy marked <span class="tag">estimated</span>
comes from the profile's power model, not a sensor.</p>
<table><thead><tr><th>id</th><th>pipeline</th><th>parameters</th><th>accuracy</th><th>drop (pts)</th>
<th>size (KiB)</th><th>p50 (ms)</th><th>p90 (ms)</th><th>p99 (ms)</th><th>peak mem (MB)</th><th>energy (mJ)</th>
<th>feasible</th><th>violations / error</th></tr></thead>
<tbody>
{rows}
</tbody></table>
</body></html>
"""


def write_report(results: dict[str, Any], path: Path) -> None:
    """Write report.html next to results.json."""
    path.write_text(render_report(results), encoding="utf-8")
