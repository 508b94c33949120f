"""The device registry: every registered device, in one SQLite file (`registry.sqlite` in the state folder).

It stores how to reach a device and what it is, never a secret: a key *path* (or none,
for ssh-agent), never a password or key material; the pinned host key is public.

Where a device is, is stored as its tagged target (`target`, JSON: `{"kind": "ssh", "host": ...}`,
`{"kind": "qemu", "settings": {...}}`, `{"kind": "local"}`, or a plugin's kind with its settings;
orchestrator/devices/base.py `Target`). The flat SSH columns are still written, for the versions
before the target column, and read only to migrate a registry written by one of them: opening it
fills every row's `target` from them (`MIGRATIONS`, `_migrate_targets`). An emulated device's
settings (sysroot, CPU model, cores, memory, its device view) are its target's; `extra` keeps other
facts of a device (a full-system VM's pid and folder).
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.devices.base import Device, EmulatedTarget, LocalTarget, PluginTarget, SshTarget, Target, \
    target_from_json, target_json
from orchestrator.errors import DeviceNotFound, DeviceRefused
from orchestrator.state.paths import state_dir
from orchestrator.state.sqlite import connect, writing

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    name TEXT PRIMARY KEY,
    transport TEXT NOT NULL DEFAULT 'ssh',
    host TEXT NOT NULL,            -- ssh only: '' for an emulated device (as are port 0, user, host_key)
    port INTEGER NOT NULL,
    user TEXT NOT NULL,
    key_path TEXT,                 -- a path to the private key, or NULL for ssh-agent; never key material
    host_key TEXT NOT NULL,        -- pinned public host key, "TYPE BASE64"
    profile TEXT NOT NULL,         -- the profile's name (what `orchestrate --profile` matches)
    profile_path TEXT NOT NULL,
    tags TEXT NOT NULL,            -- JSON list
    python TEXT NOT NULL,          -- the device's interpreter
    remote_dir TEXT NOT NULL,      -- the agent's folder on the device
    arch TEXT,
    info TEXT,                     -- JSON, the agent's last `info`
    status TEXT NOT NULL,          -- online | offline | host-key-changed
    status_reason TEXT,
    last_seen REAL,
    registered_at REAL NOT NULL,
    deployed_model TEXT,           -- sha256 of the model rolled out to it (set by the rollout)
    extra TEXT,                    -- JSON: other facts of the device (a full-system VM's pid and folder)
    target TEXT                    -- JSON: the tagged target, {"kind": "ssh" | "qemu" | "local" | a plugin's, ...}
);
"""
# Columns added after the first release: (name, declaration) for ALTER TABLE on older files.
MIGRATIONS = (("extra", "extra TEXT"), ("target", "target TEXT"))
STATUSES = ("online", "offline", "host-key-changed")


def registry_path() -> Path:
    """The SQLite file of the device registry."""
    return state_dir() / "registry.sqlite"


def key_fingerprint(host_key: str) -> str:
    """`SHA256:...` of a `TYPE BASE64` public key, as `ssh-keygen -l` prints it."""
    blob = base64.b64decode(host_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass
class RegisteredDevice:
    """One row of the registry."""

    name: str
    host: str
    port: int
    user: str
    key_path: str | None
    host_key: str
    profile: str
    profile_path: str
    tags: list[str] = field(default_factory=list)
    python: str = "python3"
    remote_dir: str = ".edge-orchestrator"
    arch: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    status: str = "online"
    status_reason: str | None = None
    last_seen: float | None = None
    registered_at: float = 0.0
    deployed_model: str | None = None
    transport: str = "ssh"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def emulated(self) -> bool:
        """An emulated device (QEMU): no SSH, no host key."""
        return self.transport == "qemu"

    @property
    def emulated_vm(self) -> bool:
        """A full-system QEMU VM (`devices emulate --mode system`): reached over SSH like a board, but emulated."""
        return self.transport == "ssh" and self.extra.get("mode") == "system"

    @property
    def host_key_fingerprint(self) -> str | None:
        """The pinned host key's SHA256 fingerprint (None for an emulated device)."""
        return key_fingerprint(self.host_key) if self.host_key else None

    @property
    def address(self) -> str:
        """Where it is: user@host:port, or what emulates it."""
        if self.emulated:
            return f"qemu-{self.extra.get('mode', 'user')} -cpu {self.extra.get('qemu_cpu')}"
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def target(self) -> Target:
        """Where it is: the tagged target its row stores."""
        if self.transport == "ssh":
            return SshTarget(host=self.host, port=self.port, user=self.user, key_path=self.key_path,
                             host_key=self.host_key, python=self.python, remote_dir=self.remote_dir)
        if self.transport == "local":
            return LocalTarget()
        return EmulatedTarget(dict(self.extra)) if self.emulated else PluginTarget(self.transport, dict(self.extra))

    def ssh_target(self) -> SshTarget:
        """How to reach it over SSH; ValueError for a device of another kind."""
        if not isinstance(target := self.target, SshTarget):
            what = "emulated" if self.emulated else f"a {self.transport} device"
            raise ValueError(f"device {self.name} is {what}: it has no SSH target")
        return target

    def device(self) -> Device:
        """The device as a run measures on it."""
        return Device(name=self.name, transport=self.transport, arch=self.arch or ("aarch64" if self.emulated else "unknown"),
                      emulated=self.emulated, extra=dict(self.extra), target=self.target)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the host key's fingerprint (None when emulated) and whether it is emulated."""
        return {**asdict(self), "host_key_fingerprint": self.host_key_fingerprint,
                "emulated": self.emulated or self.emulated_vm}


class DeviceRegistry:
    """Registered devices. Every write is one transaction."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else registry_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with writing(self.path) as db:  # a registry this user cannot write: one line saying so
            db.executescript(SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(devices)")}
            for name, declaration in MIGRATIONS:
                if name not in have:
                    try:
                        db.execute(f"ALTER TABLE devices ADD COLUMN {declaration}")
                    except sqlite3.OperationalError as exc:  # another process added it just now
                        if "duplicate column" not in str(exc):
                            raise
            _migrate_targets(db)

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path)

    def add(self, device: RegisteredDevice) -> None:
        """Insert a new device; a name already taken is refused."""
        row = asdict(device)
        row["tags"], row["info"] = json.dumps(device.tags), json.dumps(device.info)
        row["extra"] = json.dumps(device.extra) if device.extra else None
        row["target"] = json.dumps(target_json(device.target))
        row["registered_at"] = row["registered_at"] or time.time()
        cols = ", ".join(row)
        try:
            with closing(self._connect()) as db, db:
                db.execute(f"INSERT INTO devices ({cols}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
        except sqlite3.IntegrityError:
            raise DeviceRefused(
                f"a device named {device.name!r} is already registered (orchestrate devices remove {device.name} first)"
            ) from None

    def get(self, name: str) -> RegisteredDevice:
        """One device by name."""
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM devices WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = ", ".join(d.name for d in self.list()) or "none"
            raise DeviceNotFound(f"no device named {name!r} in {self.path} (registered: {known})")
        return _from_row(row)

    def list(self, profile: str | None = None) -> list[RegisteredDevice]:
        """All devices, or those of one profile (by the profile's name), by name."""
        query, args = "SELECT * FROM devices", ()
        if profile is not None:
            query, args = query + " WHERE profile = ?", (profile,)
        with closing(self._connect()) as db:
            return [_from_row(r) for r in db.execute(query + " ORDER BY name", args).fetchall()]

    def remove(self, name: str) -> None:
        """Forget a device."""
        self.get(name)
        with closing(self._connect()) as db, db:
            db.execute("DELETE FROM devices WHERE name = ?", (name,))

    def set_status(self, name: str, status: str, reason: str | None = None, info: dict[str, Any] | None = None) -> None:
        """Record what the last contact found; `online` also sets last_seen (and info, arch when given)."""
        if status not in STATUSES:
            raise ValueError(f"unknown device status {status!r}")
        with closing(self._connect()) as db, db:
            if status == "online":
                db.execute("UPDATE devices SET status = ?, status_reason = NULL, last_seen = ? WHERE name = ?",
                           (status, time.time(), name))
            else:
                db.execute("UPDATE devices SET status = ?, status_reason = ? WHERE name = ?", (status, reason, name))
            if info is not None:
                db.execute("UPDATE devices SET info = ?, arch = ? WHERE name = ?",
                           (json.dumps(info), info.get("arch"), name))

    def set_deployed_model(self, name: str, sha256: str | None) -> None:
        """Record the model (sha256) current on the device after a rollout or rollback (None: none)."""
        with closing(self._connect()) as db, db:
            db.execute("UPDATE devices SET deployed_model = ? WHERE name = ?", (sha256, name))


#: The status of a device whose row cannot be read whole (tags, info or extra not JSON): shown as such,
#: never measured on or deployed to until it is removed and registered again.
DAMAGED = "damaged"


def _migrate_targets(db: sqlite3.Connection) -> None:
    """Rows written before the `target` column: their target, made from the flat columns they have."""
    for row in db.execute("SELECT * FROM devices WHERE target IS NULL").fetchall():
        device = _from_row(row)
        if device.status != DAMAGED:
            db.execute("UPDATE devices SET target = ? WHERE name = ?", (json.dumps(target_json(device.target)), row["name"]))


def _with_target(data: dict[str, Any], target: Target) -> None:
    """The row's fields as its stored target says (the target is what is true; the flat columns follow it)."""
    data["transport"] = target.kind
    if isinstance(target, SshTarget):
        data.update(host=target.host, port=target.port, user=target.user, key_path=target.key_path,
                    host_key=target.host_key, python=target.python, remote_dir=target.remote_dir)
    elif isinstance(target, (EmulatedTarget, PluginTarget)):
        data["extra"] = {**data["extra"], **target.settings}


def _from_row(row: sqlite3.Row) -> RegisteredDevice:
    data = dict(row)
    stored = data.pop("target", None)
    damaged = []
    for column, empty, kind in (("tags", "[]", list), ("info", "{}", dict), ("extra", "{}", dict)):
        try:
            value = json.loads(data.get(column) or empty)
        except ValueError as exc:
            damaged.append(f"{column} not valid JSON ({exc})")
            value = json.loads(empty)
        else:
            if not isinstance(value, kind):
                damaged.append(f"{column} a JSON {type(value).__name__}, not a {kind.__name__}")
                value = json.loads(empty)
        data[column] = value
    if stored is not None:
        try:
            _with_target(data, target_from_json(json.loads(stored)))
        except ValueError as exc:
            damaged.append(f"target not a device target ({exc})")
    if damaged:  # the rest of the row is shown; the device is not used
        data["status"] = DAMAGED
        data["status_reason"] = f"its registry row is damaged: {'; '.join(damaged)} " \
                                f"(orchestrate devices remove {data['name']}, then register it again)"
    return RegisteredDevice(**data)
