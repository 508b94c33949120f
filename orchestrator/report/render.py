"""report.html: one self-contained page (opens offline) with the Pareto plots, every candidate, the pick."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from orchestrator.metrics import REPORT, Metric, shown_in
from orchestrator.report.plots import axes, pareto_svg
from orchestrator.search.selection import pipeline_label

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:.85rem}th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th{background:#f2f2f2;cursor:pointer;user-select:none}th.sorted-asc::after{content:" ▲"}th.sorted-desc::after{content:" ▼"}
td.l{text-align:left}tr.best{background:#e6f6e6}tr.failed{color:#999}
.tag{font-size:.7rem;padding:0 .3rem;border-radius:.2rem;background:#fde9c4;margin-left:.3rem;color:#8a4b00}
.front{font-weight:bold}code{background:#f4f4f4;padding:0 .2rem}.plots{display:flex;flex-wrap:wrap;gap:1rem}
.plots figure{margin:0}.muted{color:#666}
"""

# Click a header to sort by it (numbers numerically, "–" last).
SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var asc = !th.classList.contains('sorted-asc');
      table.querySelectorAll('th').forEach(function (h) { h.classList.remove('sorted-asc', 'sorted-desc'); });
      th.classList.add(asc ? 'sorted-asc' : 'sorted-desc');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var text = row.cells[col].getAttribute('data-sort') || row.cells[col].textContent.trim();
        var num = parseFloat(text);
        return isNaN(num) ? text : num;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === y) return 0;
        if (typeof x !== typeof y) return typeof x === 'number' ? -1 : 1;
        return (x < y ? -1 : 1) * (asc ? 1 : -1);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _num(value: Any, digits: int = 3, tag: str | None = None) -> str:
    sort = "" if value is None else f' data-sort="{value}"'
    text = _fmt(value, digits) + (f'<span class="tag">{tag}</span>' if tag and value is not None else "")
    return f"<td{sort}>{text}</td>"


def _cell(row: Metric, metrics: dict[str, Any], latency_tag: str | None) -> str:
    """A metric's cell as the table of metrics says, tagged (estimated energy, an emulated device's latency)."""
    tag = latency_tag if row.percentile is not None else row.tag(metrics)
    return _num(row.shown_value(metrics), row.digits, tag)


def _row(c: dict[str, Any], best_id: str | None, latency_tag: str | None, columns: list[Metric]) -> str:
    m = c.get("metrics") or {}
    cls = "best" if c["id"] == best_id else ("failed" if c["status"] != "ok" else "")
    notes = "; ".join(v["message"] for v in c.get("violations") or []) or (c.get("error") or "")
    params = "; ".join(f"{s['technique']}: {json.dumps(s['params'])}" for s in c["pipeline"]) or "exported unchanged"
    build = sum((c.get("build") or {}).values()) if c.get("build") else None
    return (
        f'<tr class="{cls}" data-id="{html.escape(c["id"])}"><td class="l{" front" if c.get("on_front") else ""}">'
        f'{html.escape(c["id"])}</td><td class="l">{html.escape(pipeline_label(c))}</td>'
        f'<td class="l"><code>{html.escape(params)}</code></td>'
        f"{''.join(_cell(row, m, latency_tag) for row in columns)}"
        f"{_num(build, 1)}<td class=\"l\">{html.escape(str(c.get('device') or ''))}</td>"
        f"<td class=\"l\">{'yes' if c.get('feasible') else 'no'}</td><td class=\"l\">{html.escape(notes)}</td></tr>"
    )


def _model_line(results: dict[str, Any]) -> str:
    """For a model brought with --model: where it came from, and what its "accuracy" figures measure."""
    model = results.get("model")
    if not model:
        return ""
    inputs = ", ".join(f"{i['name']} {i['dtype']} ({' x '.join(map(str, i['shape']))})" for i in model.get("inputs", []))
    return (f"<p>Model <code>{html.escape(str(model.get('source')))}</code> ({html.escape(str(model.get('kind')))}), "
            f"inputs {html.escape(inputs)}; samples: {html.escape(str(model.get('samples')))}. The accuracy columns "
            f"below are its quality: <b>{html.escape(str(model.get('quality_metric')))}</b>, "
            f"{html.escape(str(model.get('quality_means')))}.</p>\n")


def _pick_section(results: dict[str, Any]) -> str:
    best, base = results.get("best"), results.get("baseline")
    if not best:
        return (f"<p><b>No model picked</b> (run {html.escape(results['status'])}): "
                f"{html.escape(results.get('message') or '')}</p>")
    steps = "".join(
        f"<li><b>{html.escape(s['technique'])}</b> <code>{html.escape(json.dumps(s['params']))}</code>"
        f"{' — ' + _fmt((best.get('build') or {}).get(s['technique']), 1) + ' s' if best.get('build') else ''}</li>"
        for s in best["pipeline"]
    ) or "<li>the base model, exported unchanged</li>"
    ratios = ""
    if base and base.get("status") == "ok":
        bm, pm = base["metrics"], best["metrics"]
        drop = pm.get("accuracy_drop") or 0.0
        change = f"{drop:.2f} points lost" if drop >= 0 else f"{-drop:.2f} points gained"
        ratios = (f"<p>Against the baseline: {bm['size_bytes'] / pm['size_bytes']:.2f}x smaller, "
                  f"{bm['latency_ms']['p50'] / pm['latency_ms']['p50']:.2f}x faster at p50, "
                  f"accuracy {pm['accuracy']:.4f} vs {bm['accuracy']:.4f} ({change}).</p>")
    obj = results["objective"]
    tie = obj.get("tie_within") or 0.0
    order = obj.get("tie_break") or ["size", "accuracy"]
    words = {"size": "the smaller", "accuracy": "the more accurate"}
    ties = (f"; values within {100 * tie:.3g}% of the best count as a tie, which goes to "
            + ", then ".join(words.get(r, r) for r in order) + " candidate" if tie else "")
    if decision_rule := (results.get("decision") or {}).get("tie_broken_by"):
        ties += f" (this pick: a tie broken by {html.escape(decision_rule)})"
    decision = results.get("decision") or {}
    final = ""
    if decision.get("sentence"):
        rows = "".join(
            f"<tr><td class=l>{html.escape(f['id'])}</td><td class=l>{html.escape(f['pipeline'])}</td>"
            f"<td>{f['median_ms']:.3f}</td><td>{_percent(f.get('cv'))}</td><td>{f['vs_leader']['ratio']:.3f} "
            f"({f['vs_leader']['low']:.3f}–{f['vs_leader']['high']:.3f})</td></tr>"
            for f in decision.get("finalists", []))
        final = (f"<p><b>Final round:</b> {html.escape(decision['sentence'])}. "
                 f"Decided by: {html.escape(decision['decided_by'])}; rule: {html.escape(decision['rule'])}.</p>"
                 f"<table><tr><th>id</th><th>pipeline</th><th>median {html.escape(decision.get('percentile', ''))} ms"
                 f"</th><th>CV across rounds</th><th>vs the fastest (95%)</th></tr>{rows}</table>")
    elif decision.get("error"):
        final = f"<p><b>Final round failed</b> ({html.escape(decision['error'])}): the pick rests on the search.</p>"
    return (f"<h2>The pick: {html.escape(best['id'])} ({html.escape(pipeline_label(best))})</h2>"
            f"<p>Chosen on the Pareto front of the feasible candidates by <b>{html.escape(obj['metric'])}</b> "
            f"({html.escape(obj['goal'])}){ties}. Pipeline:</p><ol>{steps}</ol>{ratios}{final}")


def _percent(share: float | None) -> str:
    """0.034 as '3.4%'; '-' where a results.json from before the figure existed has none."""
    return "-" if share is None else f"{100 * share:.1f}%"


def _constraints_section(results: dict[str, Any]) -> str:
    limits = {k: v for k, v in (results.get("constraints") or {}).items() if v is not None}
    broke: dict[str, list[str]] = {}
    for c in results["candidates"]:
        for v in c.get("violations") or []:
            broke.setdefault(v["constraint"], []).append(c["id"])
    rows = "".join(
        f"<tr><td class=\"l\">{html.escape(k)}</td><td>{html.escape(str(v))}</td>"
        f"<td class=\"l\">{html.escape(', '.join(broke.get(k, [])) or 'none')}</td></tr>"
        for k, v in limits.items()
    )
    if "status" in broke:
        rows += f"<tr><td class=\"l\">(failed)</td><td>–</td><td class=\"l\">{', '.join(broke['status'])}</td></tr>"
    return ("<h2>Constraints</h2><table><thead><tr><th>constraint</th><th>limit</th><th>broken by</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def _sci(value: Any) -> str:
    """A sortable cell in scientific notation (tiny differences)."""
    return "<td>-</td>" if value is None else f'<td data-sort="{value}">{value:.1e}</td>'


def _emulation_section(results: dict[str, Any]) -> str:
    """For an emulated device: the note, and per candidate the functional check and the emulated latency."""
    device = results.get("device") or {}
    if not device.get("emulated"):
        return ""
    counted = device.get("latency_source") == "emulated-icount"
    rows = []
    for c in results["candidates"]:
        m = c.get("measurement") or {}
        parity = m.get("parity") or {}
        check = ("passed" if parity.get("passed") else "failed") if parity else (
            "failed" if "fails on aarch64" in (c.get("error") or "") else "-")
        count = m.get("instructions") or {}
        figures = (f"{_num(count.get('median'), 0)}{_num(count.get('spread'), 4)}" if counted else
                   f"{_num((m.get('emulated_latency_ms') or {}).get('p50'), 3)}"
                   f"{_num((m.get('native_latency_ms') or {}).get('p50'), 3)}")
        rows.append(
            f'<tr><td class="l">{html.escape(c["id"])}</td><td class="l">{html.escape(pipeline_label(c))}</td>'
            f'<td class="l">{html.escape(str(parity.get("precision", "-")))}</td><td class="l">{check}</td>'
            f"{_sci(parity.get('relative_diff'))}{_num(parity.get('argmax_agreement'), 3)}{figures}</tr>"
        )
    heads = ("<th>instructions / inference (counted)</th><th>spread of the counted runs</th>" if counted else
             "<th>emulated p50 (ms, information)</th><th>native p50 (ms)</th>")
    return (f"<h2>Emulated device</h2><p>{html.escape(device.get('note') or '')}</p>"
            "<table><thead><tr><th>id</th><th>pipeline</th><th>precision</th><th>aarch64 check</th>"
            f"<th>max |diff| / max |host|</th><th>top-1 agreement</th>{heads}</tr></thead><tbody>{''.join(rows)}"
            "</tbody></table>")


def render_report(results: dict[str, Any]) -> str:
    """The report page as a string."""
    best = results.get("best")
    device = results.get("device") or {}
    emulated = bool(device.get("emulated"))
    # an emulated device's latencies are native ones, scaled (docs/emulation.md); an older run's were emulated
    latency_tag = (device.get("latency_source") or "emulated") if emulated else None
    objective = (results.get("objective") or {}).get("metric")
    columns = shown_in(REPORT, objective)  # the table of metrics' report rows, and the profile's objective
    rows = "\n".join(_row(c, best["id"] if best else None, latency_tag, columns) for c in results["candidates"])
    plots = [pareto_svg(results, axis.name) for axis in axes(objective)]
    headers = "".join(f"<th>{html.escape(m.column('report'))}</th>" for m in columns)
    figures = "".join(f'<figure class="plot">{svg}</figure>' for svg in plots if svg)
    devices = results.get("devices") or [device]
    device_items = "".join(
        f"<li><b>{html.escape(str(d.get('name')))}</b>: {html.escape(str(d.get('transport')))}, "
        f"{html.escape(str(d.get('arch')))}{' <span class=tag>emulated</span>' if d.get('emulated') else ''}</li>"
        for d in devices
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edge-orchestrator run {html.escape(results['run_id'])}</title>
<style>{STYLE}</style></head><body>
<h1>Run {html.escape(results['run_id'])}</h1>
<p>Profile <b>{html.escape(results['profile'])}</b> (<code>{html.escape(results.get('profile_path', ''))}</code>),
task <b>{html.escape(results['task'])}</b>, status <b>{html.escape(results['status'])}</b>.</p>
{_model_line(results)}<p>Measured on:</p><ul>{device_items}</ul>
{_pick_section(results)}
<h2>Pareto front</h2>
<p class="muted">Accuracy on held-out data against {html.escape(", ".join(a.label for a in axes(objective)))}. Orange: the front of the feasible
candidates; black square: the baseline; green star: the pick; grey crosses broke a constraint.
Values marked <span class="tag">estimated</span> come from the profile's power model, not a sensor;
<span class="tag">emulated</span> latencies were measured under QEMU; <span class="tag">native-scaled</span> ones
were measured natively on the orchestrator host and multiplied by the profile's <code>emulation.latency_scale</code>
(the device is emulated); <span class="tag">emulated-icount</span> ones are the guest instructions counted on the
emulated CPU model times the profile's cost model (an estimate until it is calibrated on a board).</p>
<div class="plots">{figures or '<p>No candidate was measured.</p>'}</div>
{_emulation_section(results)}
<h2>All candidates</h2>
<p class="muted">Click a column to sort. Bold ids are on the Pareto front. Build time is the cost of making the
candidate (training, fine-tuning, export, quantization) in seconds.</p>
<table class="sortable" id="candidates"><thead><tr><th>id</th><th>pipeline</th><th>parameters</th>{headers}
<th>build (s)</th><th>device</th><th>feasible</th><th>violations / error</th></tr></thead>
<tbody>
{rows}
</tbody></table>
{_constraints_section(results)}
<script>{SORT_JS}</script>
</body></html>
"""


def write_report(results: dict[str, Any], path: Path) -> None:
    """Write report.html next to results.json."""
    path.write_text(render_report(results), encoding="utf-8")
