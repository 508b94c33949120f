"""Render a page in headless Chromium (Debian's `chromium`) and read back what a script in the page found."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def run_in_page(page: Path, script: str, timeout: float = 60) -> dict:
    """Open `page` with `script` appended; the script sets `window.CHECK = {...}`; returns that object."""
    assert CHROMIUM, "chromium is not installed"
    probe = page.with_name(page.stem + ".check.html")
    text = page.read_text(encoding="utf-8")
    hook = ("<script>try{" + script + "}catch(e){window.CHECK={error:String(e)}}"
            "document.body.setAttribute('data-check', JSON.stringify(window.CHECK));</script>")
    probe.write_text(text.replace("</body>", hook + "</body>"), encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="eo-chromium-") as profile:
        out = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
             probe.resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout,
        ).stdout
    found = re.search(r'<body[^>]*data-check="([^"]*)"', out)
    assert found, f"the page did not run the check script; chromium printed {out[:500]!r}"
    return json.loads(html.unescape(found.group(1)))


# Counts what the browser actually laid out: the plots' point groups with a non-empty box,
# and the candidate table's rows; then sorts the table by accuracy with a real click.
REPORT_CHECK = """
var plots = Array.prototype.map.call(document.querySelectorAll('figure.plot svg'), function (svg) {
  var groups = {};
  svg.querySelectorAll('g[id^="points-"]').forEach(function (g) {
    var box = g.getBBox();
    groups[g.id] = {children: g.querySelectorAll('path,use').length, width: box.width, height: box.height};
  });
  var box = svg.getBoundingClientRect();
  return {width: box.width, height: box.height, groups: groups, text: svg.textContent};
});
var ids = Array.prototype.map.call(document.querySelectorAll('#candidates tbody tr'), function (r) {
  return r.getAttribute('data-id');
});
var headers = Array.prototype.map.call(document.querySelectorAll('#candidates th'), function (h) { return h.textContent; });
document.querySelectorAll('#candidates th')[headers.indexOf('accuracy')].click();
var sorted = Array.prototype.map.call(document.querySelectorAll('#candidates tbody tr'), function (r) {
  return r.getAttribute('data-id');
});
window.CHECK = {plots: plots, ids: ids, sorted_by_accuracy: sorted, external: document.querySelectorAll('[src^="http"], link[href^="http"]').length};
"""
