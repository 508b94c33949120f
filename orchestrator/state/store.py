"""The run store: every run and every candidate, in one SQLite file (WAL, one transaction per write)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from orchestrator.errors import DiskFull, RunNotFound, StateFileError
from orchestrator.state.sqlite import connect, writing

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    profile TEXT NOT NULL,
    profile_path TEXT NOT NULL,
    task TEXT NOT NULL,
    status TEXT NOT NULL,          -- running | finished | no_feasible | interrupted | failed
    started_at REAL NOT NULL,
    finished_at REAL,
    out_dir TEXT,
    device TEXT,                   -- JSON
    best_id TEXT,
    message TEXT,
    options TEXT,                  -- JSON: what the run was asked for (trials, task, profile hash, ...), for --resume
    pid INTEGER,                   -- the driver process while the run is `running`
    host TEXT
);
CREATE TABLE IF NOT EXISTS candidates (
    run_id TEXT NOT NULL REFERENCES runs(id),
    id TEXT NOT NULL,
    record TEXT NOT NULL,          -- JSON, the results.json candidate
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (run_id, id)
);
"""


#: In a run's folder: the held-out input rows (by input name) that the rollout's health check feeds.
SAMPLES_FILE = "samples.npz"
SAMPLE_ROWS = 8

#: The longest id (of a run, a rollout) looked up by prefix: SQLite refuses a LIKE pattern over 50,000
#: bytes ("LIKE or GLOB pattern too complex"), and an id is a time stamp, a profile name and 6 hex digits.
MAX_ID_CHARS = 1000


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float (at any depth) made None: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def strict_json(value: Any, indent: int | None = None) -> str:
    """`value` as strict JSON (RFC 8259): a NaN or an infinity, which Python would write as the invalid
    `NaN`/`Infinity`, is written as null, so any JSON reader (jq, a browser, another language) reads it."""
    return json.dumps(_finite(value), indent=indent, allow_nan=False)


def like_prefix(text: str) -> str:
    """A LIKE pattern matching what starts with `text`, its own `%` and `_` taken literally (ESCAPE '\\').

    An id longer than MAX_ID_CHARS names nothing: RunNotFound saying so (without echoing it).
    """
    if len(text) > MAX_ID_CHARS:
        raise RunNotFound(f"an id of {len(text)} characters names nothing (ids are at most {MAX_ID_CHARS})")
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def read_results(path: Path) -> dict[str, Any]:
    """A run's results.json, checked to have the shape a run writes (what `deploy` reads of it).

    Missing or unreadable: OSError/ValueError as json and open raise them; there but of another
    shape (`best` a string, ...): StateFileError naming the file and the field.
    """
    results = json.loads(Path(path).read_text(encoding="utf-8"))
    problem = None
    if not isinstance(results, dict):
        problem = f"(top level): expected a JSON object, got {type(results).__name__}"
    elif not isinstance(results.get("profile"), str):
        problem = f"profile: expected a string, got {type(results.get('profile')).__name__}"
    elif results.get("best") is not None:
        best = results["best"]
        if not isinstance(best, dict):
            problem = f"best: expected an object (the chosen candidate) or null, got {type(best).__name__}"
        else:
            for key, kind in (("id", str), ("model_sha256", (str, type(None))), ("pipeline", list)):
                if not isinstance(best.get(key), kind):
                    problem = f"best.{key}: not {'a list' if kind is list else 'a string'}, got " \
                              f"{type(best.get(key)).__name__}"
                    break
    if problem is None and not isinstance(results.get("constraints") or {}, dict):
        problem = f"constraints: expected an object, got {type(results['constraints']).__name__}"
    if problem:
        raise StateFileError(f"{path}: {problem}: not a results.json as a run writes it")
    return results


#: The ballast a run store keeps beside itself (`runs.sqlite.reserve`): removed when the disk fills, so the
#: run can still be closed as failed in the store (a few pages of WAL) instead of staying `running`.
RESERVE_BYTES = 512 << 10


class RunStore:
    """Runs and their candidates. Safe to use from one process at a time per write."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with writing(self.path) as db:
            db.executescript(SCHEMA)
            have = {row["name"] for row in db.execute("PRAGMA table_info(runs)")}
            for column in ("options TEXT", "pid INTEGER", "host TEXT"):  # stores made before --resume
                if column.split()[0] not in have:
                    db.execute(f"ALTER TABLE runs ADD COLUMN {column}")

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path)

    def start_run(self, run_id: str, profile: str, profile_path: str, task: str, out_dir: str,
                  options: dict[str, Any] | None = None) -> None:
        """Record a new run as `running`, owned by this process."""
        self.keep_reserve()
        with writing(self.path) as db:
            db.execute(
                "INSERT INTO runs (id, profile, profile_path, task, status, started_at, out_dir, options, pid, host) "
                "VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                (run_id, profile, profile_path, task, time.time(), out_dir, strict_json(options or {}),
                 os.getpid(), socket.gethostname()),
            )

    def reopen_run(self, run_id: str, spent_s: float = 0.0) -> None:
        """Mark a stopped run `running` again, owned by this process (`--resume`).

        Its start moves to `spent_s` before now, so that the time between its stop and this
        resume does not count against its time budget.
        """
        self.keep_reserve()
        with writing(self.path) as db:
            db.execute("UPDATE runs SET status = 'running', finished_at = NULL, message = NULL, pid = ?, host = ?, "
                       "started_at = ? WHERE id = ?", (os.getpid(), socket.gethostname(), time.time() - spent_s, run_id))

    def set_device(self, run_id: str, device: dict[str, Any]) -> None:
        """Record the device(s) a run measures on."""
        with writing(self.path) as db:
            db.execute("UPDATE runs SET device = ? WHERE id = ?", (strict_json(device), run_id))

    def add_candidate(self, run_id: str, candidate: dict[str, Any]) -> None:
        """Insert or replace one candidate record (atomic)."""
        with writing(self.path) as db:
            db.execute(
                "INSERT OR REPLACE INTO candidates (run_id, id, record, status, created_at) VALUES (?, ?, ?, ?, ?)",
                (run_id, candidate["id"], strict_json(candidate), candidate["status"], time.time()),
            )

    def finish_run(self, run_id: str, status: str, best_id: str | None = None, message: str | None = None) -> None:
        """Close a run with its final status. On a full disk the reserve is given up and the close tried again,
        so the run is stored as it ended (`failed`, with the line) rather than left `running`."""
        for attempt in (1, 2):
            try:
                with writing(self.path) as db:
                    db.execute(
                        "UPDATE runs SET status = ?, finished_at = ?, best_id = ?, message = ? WHERE id = ?",
                        (status, time.time(), best_id, message, run_id),
                    )
                return
            except DiskFull:
                if attempt == 2 or not self.release_reserve():
                    raise

    @property
    def reserve_path(self) -> Path:
        """The ballast file beside the store (RESERVE_BYTES)."""
        return self.path.with_name(self.path.name + ".reserve")

    def keep_reserve(self) -> None:
        """Make the ballast file beside the store if it is missing (at a run's start; best effort)."""
        if self.reserve_path.exists():
            return
        try:
            with open(self.reserve_path, "wb") as fh:
                os.posix_fallocate(fh.fileno(), 0, RESERVE_BYTES)
        except OSError:  # no room for it now: the run goes on without one
            with contextlib.suppress(OSError):
                self.reserve_path.unlink()

    def release_reserve(self) -> bool:
        """Give the ballast's space back (the disk is full); whether there was one."""
        try:
            self.reserve_path.unlink()
            return True
        except OSError:
            return False

    def list_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest runs first, with candidate counts."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT r.*, (SELECT COUNT(*) FROM candidates c WHERE c.run_id = r.id) AS n_candidates "
                "FROM runs r ORDER BY started_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [dict(r) for r in rows]

    def get_run(self, run_id: str) -> dict[str, Any]:
        """One run with its candidates; a unique prefix of the id is enough (`%` and `_` are no wildcards)."""
        if not run_id:
            raise RunNotFound(f"an empty run id names no run in {self.path}")
        with closing(self._connect()) as db:
            rows = db.execute("SELECT * FROM runs WHERE id LIKE ? ESCAPE '\\' ORDER BY id",
                              (like_prefix(run_id),)).fetchall()
            if len(rows) != 1:
                what = "no run" if not rows else f"{len(rows)} runs"
                raise RunNotFound(f"{what} with id {run_id!r} in {self.path}")
            run = dict(rows[0])
            cands = db.execute(
                "SELECT id, record, status, created_at FROM candidates WHERE run_id = ? ORDER BY id", (run["id"],)
            ).fetchall()
        run["damaged"] = damaged = []  # what of the row could not be read: shown as damaged, the rest goes on
        device = _json_field(run["device"], "device", damaged) if run["device"] else None
        run["device"] = device if isinstance(device, dict) or device is None else None
        options = _json_field(run["options"], "options", damaged) if run.get("options") else {}
        run["options"] = options if isinstance(options, dict) else {}
        run["last_candidate_at"] = max((c["created_at"] for c in cands), default=None)
        run["candidates"] = [_candidate(c, damaged) for c in cands]
        return run


def _json_field(text: str, what: str, damaged: list[str]) -> Any:
    """A stored JSON value; one that does not parse is noted in `damaged` (its value is then None)."""
    try:
        return json.loads(text)
    except ValueError as exc:
        damaged.append(f"{what}: not valid JSON ({exc})")
        return None


def _candidate(row: sqlite3.Row, damaged: list[str]) -> dict[str, Any]:
    """A stored candidate record; one that is not a JSON object becomes a `damaged` candidate with its id."""
    record = _json_field(row["record"], f"candidate {row['id']}", damaged)
    if isinstance(record, dict) and isinstance(record.get("id"), str) and isinstance(record.get("status"), str):
        return record
    if record is not None:
        damaged.append(f"candidate {row['id']}: not a candidate record (a JSON {type(record).__name__})")
    return {"id": row["id"], "status": DAMAGED, "pipeline": None, "metrics": {}, "feasible": None,
            "error": f"its stored record cannot be read ({damaged[-1].split(': ', 1)[1]})"}


#: The status of a candidate whose stored record cannot be read (it is shown as such, never used).
DAMAGED = "damaged"


def process_alive(pid: int | None, host: str | None) -> bool:
    """Whether process `pid` on `host` still runs: knowable only on this host; elsewhere assume it does."""
    if not pid:
        return False
    if host and host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
