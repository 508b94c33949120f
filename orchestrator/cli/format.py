"""Small text helpers shared by `orchestrate devices` and `orchestrate deploy`: ages, deployment columns,
and making strings that came from a device or a plugin safe to print."""

from __future__ import annotations

import time
import unicodedata
from typing import Any

from rich.markup import escape

from orchestrator.rollout.deployments import DeploymentStore

#: Unicode categories never printed as they are: control (ESC, BEL, CR...), format (bidi overrides,
#: zero-width), line/paragraph separators, surrogates, unassigned.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Cn"})


def printable(value: Any, keep: str = "") -> str:
    """`value` as text with every control character escaped (`\\x1b`, `\\u202e`), so that a name or a
    message from a device, an inventory or a plugin cannot move the cursor, recolour or rewrite the
    terminal. Characters in `keep` (e.g. "\\n") pass as they are."""
    text = str(value)
    if text.isprintable():  # the usual case, checked fast
        return text
    out = []
    for ch in text:
        if ch in keep or unicodedata.category(ch) not in _UNPRINTABLE:
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out)


def cell(value: Any) -> str:
    """`printable(value)` for a rich table or `console.print`: its `[...]` is shown, not read as markup."""
    return escape(printable(value))


def deployment_columns(devices: list[Any]) -> dict[str, tuple[str, str]]:
    """For `devices list`: per device, (deployed model: version and candidate, last health check) as table cells."""
    rows = DeploymentStore().deployments({d.name: d.registered_at for d in devices})
    cells = {}
    for d in devices:
        row = rows.get(d.name)
        if row is None:
            cells[d.name] = (d.deployed_model[:12] if d.deployed_model else "-", "-")
            continue
        model = f"{row['version'][:12]} ({row['candidate']} {row['label']})" if row["version"] else "none"
        health, said = row["health"], "-"
        if health:
            said = f"{'ok' if health.get('healthy') else 'FAILED'} {ago(row['health_at'])}"
            if health.get("version") and health["version"] != row["version"]:
                said += f" (of {health['version'][:12]}, rolled back)" if not health.get("healthy") else \
                    f" (of {health['version'][:12]})"
        cells[d.name] = (model, said)
    return cells


def deployment_json(devices: list[Any]) -> dict[str, dict[str, Any] | None]:
    """For `devices list --json`: per device, its deployment row (version, run, candidate, last health) or None."""
    rows = DeploymentStore().deployments({d.name: d.registered_at for d in devices})
    return {d.name: rows.get(d.name) for d in devices}


def deployment_lines(device: Any) -> list[tuple[str, str]]:
    """For `devices show`: the run and candidate the device runs, and its last health check."""
    row = deployment_json([device])[device.name] or {}
    run = f"{row.get('run_id') or '-'}, {row.get('candidate') or '-'} ({row.get('label') or '-'})"
    return [("run, candidate", run), ("health", deployment_columns([device])[device.name][1])]


def ago(when: float | None) -> str:
    """How long ago `when` (a time.time() value) was: `12 s ago`, `5 min ago`, `3 h ago`, a date, or `never`."""
    if not when:
        return "never"
    seconds = time.time() - when
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h ago"
    return time.strftime("%Y-%m-%d", time.localtime(when))
