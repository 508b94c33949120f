"""The run store: every run and every candidate, in one SQLite file (WAL, one transaction per write)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from orchestrator.errors import RunNotFound

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


def connect(path: Path) -> sqlite3.Connection:
    """A connection to one of our SQLite files: WAL (readers never block the writer), rows by name."""
    db = sqlite3.connect(path, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.row_factory = sqlite3.Row
    return db


class RunStore:
    """Runs and their candidates. Safe to use from one process at a time per write."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
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
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO runs (id, profile, profile_path, task, status, started_at, out_dir, options, pid, host) "
                "VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                (run_id, profile, profile_path, task, time.time(), out_dir, json.dumps(options or {}),
                 os.getpid(), socket.gethostname()),
            )

    def reopen_run(self, run_id: str, spent_s: float = 0.0) -> None:
        """Mark a stopped run `running` again, owned by this process (`--resume`).

        Its start moves to `spent_s` before now, so that the time between its stop and this
        resume does not count against its time budget.
        """
        with closing(self._connect()) as db, db:
            db.execute("UPDATE runs SET status = 'running', finished_at = NULL, message = NULL, pid = ?, host = ?, "
                       "started_at = ? WHERE id = ?", (os.getpid(), socket.gethostname(), time.time() - spent_s, run_id))

    def set_device(self, run_id: str, device: dict[str, Any]) -> None:
        """Record the device(s) a run measures on."""
        with closing(self._connect()) as db, db:
            db.execute("UPDATE runs SET device = ? WHERE id = ?", (json.dumps(device), run_id))

    def add_candidate(self, run_id: str, candidate: dict[str, Any]) -> None:
        """Insert or replace one candidate record (atomic)."""
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT OR REPLACE INTO candidates (run_id, id, record, status, created_at) VALUES (?, ?, ?, ?, ?)",
                (run_id, candidate["id"], json.dumps(candidate), candidate["status"], time.time()),
            )

    def finish_run(self, run_id: str, status: str, best_id: str | None = None, message: str | None = None) -> None:
        """Close a run with its final status."""
        with closing(self._connect()) as db, db:
            db.execute(
                "UPDATE runs SET status = ?, finished_at = ?, best_id = ?, message = ? WHERE id = ?",
                (status, time.time(), best_id, message, run_id),
            )

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
        """One run with its candidates; a unique prefix of the id is enough."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT * FROM runs WHERE id LIKE ? ORDER BY id", (run_id + "%",)).fetchall()
            if len(rows) != 1:
                what = "no run" if not rows else f"{len(rows)} runs"
                raise RunNotFound(f"{what} with id {run_id!r} in {self.path}")
            run = dict(rows[0])
            cands = db.execute(
                "SELECT record, created_at FROM candidates WHERE run_id = ? ORDER BY id", (run["id"],)
            ).fetchall()
        run["device"] = json.loads(run["device"]) if run["device"] else None
        run["options"] = json.loads(run["options"]) if run.get("options") else {}
        run["last_candidate_at"] = max((c["created_at"] for c in cands), default=None)
        run["candidates"] = [json.loads(c["record"]) for c in cands]
        return run
