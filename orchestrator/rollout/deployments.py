"""What the rollout remembers, in the device registry's SQLite file: rollouts, their devices, each device's deployment.

Tables (created if missing, next to `devices`):

- `rollouts`: one `orchestrate deploy` of one run's model to one profile, its options, plan and status;
- `rollout_devices`: each device of a rollout: its wave and state, what it had before, its health check
  (what `deploy --resume` reads);
- `deployments`: per device, what it runs now (model sha256 = version, run, candidate) and its last
  health check. A row counts only while the device is the one registered under that name (same
  `registered_at`): a device removed and registered again starts with none.

A rollout is owned while it runs: its owner's pid, host and a heartbeat (every HEARTBEAT_S) are in
its row. A `running` rollout is live while its owner's heartbeat is fresh (and, on the same host,
its pid is alive): `deploy --resume` refuses it, and so does a new rollout of the same profile.
`orchestrate rollback` holds the same lock on its devices' profiles (`rollbacks`, one row per
profile, owned and kept alive the same way): a rollback is refused while a rollout of the profile is
live, and a rollout (new or resumed) while a rollback of the profile is.
A new rollout of a profile supersedes the profile's older unfinished ones (`superseded`): resuming
one of those would put an older model back, so `deploy --resume` refuses it unless forced.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Iterator

from orchestrator.devices.registry import registry_path
from orchestrator.errors import DeployError
from orchestrator.state.sqlite import connect
from orchestrator.state.store import like_prefix, process_alive

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    profile TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    model TEXT NOT NULL,           -- JSON: candidate id, label, precision, out_dir
    options TEXT NOT NULL,         -- JSON: canary, max_parallel, on_failure, keep
    waves TEXT NOT NULL,           -- JSON: [[device, ...], ...], the canaries first
    status TEXT NOT NULL,          -- running | done | incomplete | stopped | done-with-failures | interrupted
                                   -- | superseded
    message TEXT,
    created_at REAL NOT NULL,
    finished_at REAL,
    owner_pid INTEGER,             -- the process that runs (or last ran) it
    owner_host TEXT,
    heartbeat_at REAL,             -- its owner's last sign of life
    superseded_by TEXT             -- the newer rollout of the profile that superseded it
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    device TEXT NOT NULL,
    wave INTEGER NOT NULL,
    state TEXT NOT NULL,           -- pending | installing | healthy | rolled-back | failed | offline | skipped
    previous_version TEXT,         -- what was current before the install (sha256), if anything
    error TEXT,
    health TEXT,                   -- JSON, the agent's health check
    updated_at REAL NOT NULL,
    PRIMARY KEY (rollout_id, device)
);
CREATE TABLE IF NOT EXISTS deployments (
    device TEXT PRIMARY KEY,
    registered_at REAL NOT NULL,   -- the registry's registered_at of the device this row is about
    version TEXT,                  -- sha256 of the model current on the device, NULL if none
    run_id TEXT,
    candidate TEXT,
    label TEXT,
    precision TEXT,
    rollout_id TEXT,
    deployed_at REAL,
    health TEXT,                   -- JSON, the last health check (of any version; `version` inside says which)
    health_at REAL
);
CREATE TABLE IF NOT EXISTS rollbacks (
    id TEXT NOT NULL,              -- one `orchestrate rollback`
    profile TEXT NOT NULL,         -- a profile its devices belong to: the lock it holds
    status TEXT NOT NULL,          -- running | done
    created_at REAL NOT NULL,
    finished_at REAL,
    owner_pid INTEGER,
    owner_host TEXT,
    heartbeat_at REAL,
    PRIMARY KEY (id, profile)
);
"""
FINAL_STATES = ("healthy",)
RESUMABLE = ("incomplete", "interrupted", "running")
HEARTBEAT_S = 5.0  # how often a running rollout says it is alive
STALE_S = 30.0  # a heartbeat older than this: the owner is gone (another host: the only sign there is)
_OWNER_COLUMNS = {"owner_pid": "INTEGER", "owner_host": "TEXT", "heartbeat_at": "REAL", "superseded_by": "TEXT"}


def this_host() -> str:
    """The name a rollout's owner is recorded under."""
    return socket.gethostname()


def owner_alive(rollout: dict[str, Any], now: float | None = None) -> bool:
    """Whether a rollout is live: `running`, with a fresh heartbeat from an owner that (on this host) still runs."""
    if rollout.get("status") != "running" or not rollout.get("owner_pid"):
        return False
    now = time.time() if now is None else now
    if now - (rollout.get("heartbeat_at") or 0) > STALE_S:
        return False
    return process_alive(rollout.get("owner_pid"), rollout.get("owner_host") or this_host())


def live_message(rollout: dict[str, Any]) -> str:
    """Who runs a live rollout, as a clause."""
    age = max(0.0, time.time() - (rollout.get("heartbeat_at") or 0))
    return (f"rollout {rollout['id']} is still running (pid {rollout['owner_pid']} on {rollout['owner_host']}, "
            f"last heartbeat {age:.0f} s ago)")


def live_rollback_message(rollback: dict[str, Any]) -> str:
    """Who runs a live rollback, as a clause."""
    age = max(0.0, time.time() - (rollback.get("heartbeat_at") or 0))
    return (f"rollback {rollback['id']} is still running (pid {rollback['owner_pid']} on {rollback['owner_host']}, "
            f"last heartbeat {age:.0f} s ago) for profile {rollback['profile']!r}")


def _refuse_if_rolling_back(db: sqlite3.Connection, profile: str, doing: str, now: float) -> None:
    """DeployError when a live rollback holds `profile`: a rollout would move devices under it."""
    for row in db.execute("SELECT * FROM rollbacks WHERE profile = ? AND status = 'running' ORDER BY id", (profile,)):
        if owner_alive(dict(row), now):
            raise DeployError(f"{live_rollback_message(dict(row))}; {doing} (it would move devices under a live "
                              "rollback); wait for it to end")


class DeploymentStore:
    """Rollouts and deployments; every write is one transaction (safe from the rollout's threads)."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else registry_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(connect(self.path)) as db, db:
            db.executescript(SCHEMA)
            have = {row["name"] for row in db.execute("PRAGMA table_info(rollouts)")}
            for column, kind in _OWNER_COLUMNS.items():  # a store made before rollouts had owners
                if column not in have:
                    with contextlib.suppress(sqlite3.OperationalError):  # another process added it just now
                        db.execute(f"ALTER TABLE rollouts ADD COLUMN {column} {kind}")

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[sqlite3.Connection]:
        """One write transaction taken at once (BEGIN IMMEDIATE): read, decide and write with no one in between."""
        with closing(connect(self.path)) as db:
            db.isolation_level = None
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _write(self, sql: str, args: tuple) -> None:
        with closing(connect(self.path)) as db, db:
            db.execute(sql, args)

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with closing(connect(self.path)) as db:
            return db.execute(sql, args).fetchall()

    # rollouts ---------------------------------------------------------------------------------------

    def create_rollout(self, rollout_id: str, run_id: str, profile: str, model_sha256: str, model: dict[str, Any],
                       options: dict[str, Any], waves: list[list[str]]) -> list[str]:
        """Record a new rollout (`running`, owned by this process) and its devices (`pending`).

        The profile's older unfinished rollouts become `superseded` (their ids are returned); a
        live one refuses the new rollout (DeployError): two rollouts never drive one profile at once.
        """
        now = time.time()
        with self._exclusive() as db:
            _refuse_if_rolling_back(db, profile, "not rolled out", now)
            older = [dict(r) for r in db.execute(
                f"SELECT * FROM rollouts WHERE profile = ? AND status IN ({', '.join('?' * len(RESUMABLE))})",
                (profile, *RESUMABLE))]
            for rollout in older:
                if owner_alive(rollout, now):
                    raise DeployError(f"{live_message(rollout)} for profile {profile!r}; wait for it to end "
                                      "before starting another rollout")
            for rollout in older:
                db.execute("UPDATE rollouts SET status = 'superseded', superseded_by = ?, finished_at = ?, "
                           "message = ? WHERE id = ?",
                           (rollout_id, now, f"superseded by rollout {rollout_id} (was {rollout['status']})",
                            rollout["id"]))
            db.execute("INSERT INTO rollouts (id, run_id, profile, model_sha256, model, options, waves, status, "
                       "created_at, owner_pid, owner_host, heartbeat_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?)",
                       (rollout_id, run_id, profile, model_sha256, json.dumps(model), json.dumps(options),
                        json.dumps(waves), now, os.getpid(), this_host(), now))
            db.executemany("INSERT INTO rollout_devices (rollout_id, device, wave, state, updated_at) "
                           "VALUES (?, ?, ?, 'pending', ?)",
                           [(rollout_id, name, i, now) for i, wave in enumerate(waves) for name in wave])
        return [r["id"] for r in older]

    def begin_rollback(self, profiles: set[str]) -> str:
        """Take the lock of `profiles` for a rollback (owned by this process; returns its id), or DeployError
        when a live rollout drives one of them: the rollback would move its devices under it, and it
        would then record the wrong version as each device's previous one. Rollbacks do not exclude each other."""
        now = time.time()
        rollback_id = (f"rollback-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{int(now * 1e6) % 1_000_000:06d}"
                       f"-{os.getpid()}")
        with self._exclusive() as db:
            if profiles:
                rows = db.execute(f"SELECT * FROM rollouts WHERE status = 'running' AND profile IN "
                                  f"({', '.join('?' * len(profiles))}) ORDER BY id", tuple(sorted(profiles)))
                for row in rows:
                    rollout = dict(row)
                    if owner_alive(rollout, now):
                        raise DeployError(f"{live_message(rollout)} for profile {rollout['profile']!r}; not rolled "
                                          "back (it would move devices under a live rollout); wait for it to end")
            db.executemany("INSERT INTO rollbacks (id, profile, status, created_at, owner_pid, owner_host, "
                           "heartbeat_at) VALUES (?, ?, 'running', ?, ?, ?, ?)",
                           [(rollback_id, p, now, os.getpid(), this_host(), now) for p in sorted(profiles)])
        return rollback_id

    def rollback_heartbeat(self, rollback_id: str) -> None:
        """The rollback's owner is alive."""
        self._write("UPDATE rollbacks SET heartbeat_at = ? WHERE id = ? AND owner_pid = ? AND owner_host = ?",
                    (time.time(), rollback_id, os.getpid(), this_host()))

    def finish_rollback(self, rollback_id: str) -> None:
        """The rollback ended (however): its profiles are free."""
        self._write("UPDATE rollbacks SET status = 'done', finished_at = ? WHERE id = ?", (time.time(), rollback_id))

    def claim(self, rollout_id: str) -> None:
        """Take a stored rollout over to resume it (`running`, owned by this process); DeployError if it is live."""
        now = time.time()
        with self._exclusive() as db:
            row = db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
            if row is None:
                raise DeployError(f"no rollout with id {rollout_id!r}")
            if owner_alive(dict(row), now):
                raise DeployError(f"{live_message(dict(row))}; not resumed (one process drives a rollout at a time)")
            _refuse_if_rolling_back(db, row["profile"], "not resumed", now)
            db.execute("UPDATE rollouts SET status = 'running', message = NULL, finished_at = NULL, owner_pid = ?, "
                       "owner_host = ?, heartbeat_at = ? WHERE id = ?", (os.getpid(), this_host(), now, rollout_id))

    def heartbeat(self, rollout_id: str) -> None:
        """The owner is alive (only the owner's beat counts)."""
        self._write("UPDATE rollouts SET heartbeat_at = ? WHERE id = ? AND owner_pid = ? AND owner_host = ?",
                    (time.time(), rollout_id, os.getpid(), this_host()))

    def finish_rollout(self, rollout_id: str, status: str, message: str | None = None) -> None:
        """Set a rollout's status (and when it ended)."""
        self._write("UPDATE rollouts SET status = ?, message = ?, finished_at = ? WHERE id = ?",
                    (status, message, time.time(), rollout_id))

    def get_rollout(self, rollout_id: str) -> dict[str, Any]:
        """One rollout with its devices; a unique prefix of the id is enough."""
        rows = self._read("SELECT * FROM rollouts WHERE id LIKE ? ESCAPE '\\' ORDER BY id",
                          (like_prefix(rollout_id),))
        if len(rows) != 1:
            raise DeployError(f"{'no rollout' if not rows else f'{len(rows)} rollouts'} with id {rollout_id!r}")
        return self._with_devices(rows[0])

    def latest_resumable(self, run_id: str | None = None, profile: str | None = None) -> dict[str, Any] | None:
        """The newest rollout that can be resumed (devices left offline, or interrupted), if any."""
        query, args = "SELECT * FROM rollouts WHERE status IN (?, ?, ?)", list(RESUMABLE)
        if run_id:
            query, args = query + " AND run_id LIKE ? ESCAPE '\\'", [*args, like_prefix(run_id)]
        if profile:
            query, args = query + " AND profile = ?", [*args, profile]
        rows = self._read(query + " ORDER BY created_at DESC LIMIT 1", tuple(args))
        return self._with_devices(rows[0]) if rows else None

    def latest(self) -> dict[str, Any] | None:
        """The newest rollout, if any."""
        rows = self._read("SELECT * FROM rollouts ORDER BY created_at DESC LIMIT 1")
        return self._with_devices(rows[0]) if rows else None

    def _with_devices(self, row: sqlite3.Row) -> dict[str, Any]:
        rollout = dict(row)
        for key in ("model", "options", "waves"):
            rollout[key] = json.loads(rollout[key])
        devices = self._read("SELECT * FROM rollout_devices WHERE rollout_id = ? ORDER BY wave, device", (row["id"],))
        rollout["devices"] = {d["device"]: {**dict(d), "health": json.loads(d["health"]) if d["health"] else None}
                              for d in devices}
        return rollout

    def set_state(self, rollout_id: str, device: str, state: str, *, error: str | None = None,
                  health: dict[str, Any] | None = None, previous_version: str | None = None) -> None:
        """A device's state in a rollout; error/health/previous_version are kept unless given."""
        self._write(
            "UPDATE rollout_devices SET state = ?, error = ?, health = COALESCE(?, health), "
            "previous_version = COALESCE(?, previous_version), updated_at = ? WHERE rollout_id = ? AND device = ?",
            (state, error, json.dumps(health) if health is not None else None, previous_version, time.time(),
             rollout_id, device))

    # deployments ------------------------------------------------------------------------------------

    def record(self, device: str, registered_at: float, current: dict[str, Any] | None,
               rollout_id: str | None = None, health: dict[str, Any] | None = None) -> None:
        """What a device runs now (`current`: the agent's summary of its current version, or None)."""
        current = current or {}
        now = time.time()
        self._write(
            "INSERT INTO deployments (device, registered_at, version, run_id, candidate, label, precision, rollout_id, "
            "deployed_at, health, health_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(device) DO UPDATE SET registered_at = excluded.registered_at, version = excluded.version, "
            "run_id = excluded.run_id, candidate = excluded.candidate, label = excluded.label, "
            "precision = excluded.precision, rollout_id = COALESCE(excluded.rollout_id, rollout_id), "
            "deployed_at = excluded.deployed_at, health = COALESCE(excluded.health, health), "
            "health_at = COALESCE(excluded.health_at, health_at)",
            (device, registered_at, current.get("version"), current.get("run_id"), current.get("candidate"),
             current.get("label"), current.get("precision"), rollout_id, now,
             json.dumps(health) if health is not None else None, now if health is not None else None))

    def deployments(self, registered: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
        """Per device name, its deployment; with `registered` (name -> registered_at), only rows about those devices."""
        out = {}
        for row in self._read("SELECT * FROM deployments"):
            d = dict(row)
            if registered is not None and registered.get(d["device"]) != d["registered_at"]:
                continue
            d["health"] = json.loads(d["health"]) if d["health"] else None
            out[d["device"]] = d
        return out
