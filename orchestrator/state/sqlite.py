"""Our SQLite files (the run store, the device registry, the rollouts, the measurement cache): how they are
opened (WAL, a busy timeout), one write transaction, and what is really wrong when SQLite refuses one:
another process holding it, a full disk, a read-only or unreadable file, or a file that is no database.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from orchestrator.errors import DiskFull, StateFileError, StoreLocked

#: What SQLite says when the file is not a database at all (as opposed to busy, full, or not ours to write).
_NOT_A_DATABASE = ("SQLITE_NOTADB", "SQLITE_CORRUPT")
_LOCKED = ("SQLITE_BUSY", "SQLITE_LOCKED")
#: Seconds a command waits for another process's write to the store to end ($EDGE_ORCHESTRATOR_BUSY_TIMEOUT_S).
BUSY_TIMEOUT_ENV = "EDGE_ORCHESTRATOR_BUSY_TIMEOUT_S"
BUSY_TIMEOUT_S = 30.0


def busy_timeout() -> float:
    """How long to wait for a lock another process holds on a store."""
    try:
        value = float(os.environ.get(BUSY_TIMEOUT_ENV, BUSY_TIMEOUT_S))
    except ValueError:
        return BUSY_TIMEOUT_S
    return value if value > 0 and math.isfinite(value) else BUSY_TIMEOUT_S


def is_locked(exc: BaseException) -> bool:
    """Whether SQLite gave up waiting for another connection's lock."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    name = getattr(exc, "sqlite_errorname", None) or ""
    return name.startswith(_LOCKED) or "database is locked" in str(exc) or "database table is locked" in str(exc)


def _holders(paths: list[Path]) -> list[str]:
    """Other processes of this host that have one of `paths` (or its -wal/-journal) open: 'pid N (command)'."""
    wanted = set()
    for path in paths:
        for suffix in ("", "-wal", "-journal", "-shm"):
            with contextlib.suppress(OSError):
                wanted.add(os.path.realpath(f"{path}{suffix}"))
    found = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if not any(os.readlink(f"/proc/{pid}/fd/{fd}") in wanted for fd in fds if fd.isdigit()):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                words = [w.decode(errors="replace") for w in fh.read().split(b"\0") if w]
        except OSError:
            continue
        command = " ".join(" ".join(os.path.basename(w) if i == 0 else w for i, w in enumerate(words)).split())
        found.append(f"pid {pid} ({command[:80]}{'…' if len(command) > 80 else ''})")
    return found


def locked_error(paths: list[Path]) -> StoreLocked:
    """A store held locked by another process past the busy timeout, in one line naming the holder where known."""
    paths = [Path(p) for p in paths]
    holders = _holders(paths)
    who = f" ({', '.join(holders[:3])}{' …' if len(holders) > 3 else ''})" if holders else ""
    names = " or ".join(str(p) for p in paths)
    return StoreLocked(f"{names}: locked by another process{who} for more than {busy_timeout():g} s; "
                       f"try again when it is done")


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a folder above it that cannot be entered
        return False


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


#: Below this many free bytes in its folder, an SQLite I/O error is taken for a full disk.
FULL_BELOW_BYTES = 1 << 20


def _disk_full(path: Path, name: str) -> bool:
    if name == "SQLITE_FULL":
        return True
    if not name.startswith("SQLITE_IOERR"):
        return False
    try:
        fs = os.statvfs(path.parent)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < FULL_BELOW_BYTES


def full_error(path: Path) -> DiskFull:
    """The state folder of `path` is full, in one line naming it."""
    return DiskFull(f"{Path(path).parent}: no space left on the device ({Path(path).name} could not be written); "
                    "free some space and run again")


def state_error(path: Path, exc: sqlite3.Error) -> StateFileError | StoreLocked | DiskFull | None:
    """What is really wrong with the SQLite file `path` when SQLite raised `exc`, as one StateFileError (or
    StoreLocked: another process held it past the busy timeout); None when `exc` says nothing about the file
    itself (a bug of ours). A full disk is DiskFull naming the folder.

    Only a file that is not an SQLite database is advised to be moved away: a store this user may not
    write, or not read, is fine as it is, and moving it would lose every run (or device) in it.
    """
    path = Path(path)
    name = getattr(exc, "sqlite_errorname", None) or ""
    folder = path.parent
    if is_locked(exc):
        return locked_error([path])
    if _disk_full(path, name):
        return full_error(path)
    if name in _NOT_A_DATABASE:
        what = "a folder" if _is_dir(path) else "not an SQLite database"
        return StateFileError(f"{path}: {what} ({exc}); move it away and a new one is made")
    if name.startswith("SQLITE_READONLY"):
        if _read_only_fs(folder):
            why = f"the file system of {folder} is mounted read-only"
        elif not os.access(folder, os.W_OK):
            why = f"its folder {folder} is not writable by this user (SQLite writes its journal beside it)"
        elif path.exists() and not os.access(path, os.W_OK):
            why = f"the file is not writable by this user (mode {path.stat().st_mode & 0o777:04o})"
        else:
            why = str(exc)
        return StateFileError(f"{path}: read-only: {why}; the file is left as it is (give this user write access)")
    if name == "SQLITE_CANTOPEN":
        if _is_dir(path):
            return StateFileError(f"{path}: a folder ({exc}); move it away and a new one is made")
        if not os.access(folder, os.X_OK):
            why = f"its folder {folder} cannot be entered by this user"
        elif path.exists() and not os.access(path, os.R_OK):
            why = f"the file is not readable by this user (mode {path.stat().st_mode & 0o777:04o})"
        elif not os.access(folder, os.W_OK):
            why = (f"its folder {folder} is not writable by this user"
                   + (" (SQLite writes its journal beside it)" if path.exists() else ", so the store cannot be made"))
        elif _read_only_fs(folder):
            why = f"the file system of {folder} is mounted read-only"
        else:
            return StateFileError(f"{path}: cannot be opened ({exc})")
        return StateFileError(f"{path}: permission denied: {why}; the file is left as it is")
    return None


def connect(path: Path) -> sqlite3.Connection:
    """A connection to one of our SQLite files: WAL (readers never block the writer), rows by name.

    A file that is not an SQLite database (or a folder in its place), or one this user may not
    read or write, is a StateFileError naming it and what is wrong (state_error).
    """
    try:
        db = sqlite3.connect(path, timeout=busy_timeout())
        try:
            db.execute("PRAGMA journal_mode=WAL")
        except BaseException:
            db.close()
            raise
    except sqlite3.DatabaseError as exc:
        error = state_error(path, exc)
        if error is None:
            raise
        raise error from None
    db.row_factory = sqlite3.Row
    return db


@contextmanager
def writing(path: Path) -> Iterator[sqlite3.Connection]:
    """One write transaction on the SQLite file `path`; a store this user cannot write is a StateFileError."""
    try:
        with closing(connect(path)) as db, db:
            yield db
    except sqlite3.OperationalError as exc:
        error = state_error(path, exc)
        if error is None:
            raise
        raise error from None
