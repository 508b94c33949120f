"""The size limit of the cache folder (`<state>/cache`): least-recently-used entries go first.

- **Limit.** `$EDGE_ORCHESTRATOR_CACHE_MAX` (`500M`, `2G`, `1.5GiB`, plain bytes; every unit is a
  power of 1024; `off` for no limit), else 5 GiB.
- **Entries.** In each kind's folder, the files sharing a name before their suffix are one entry
  (a stage's `.json` with its `.pt`/`.onnx`); a sub-folder (a Ray Tune experiment) is one entry.
  An entry's last use is the newest modification time of its files: `StageCache.get` touches an
  entry's `.json` on every hit, so eviction is least-recently-used, not oldest-written.
- **Order.** Rebuildable kinds first (`stages`, `accuracy`, `tune`), then `models` (what a
  stopped run's resume, a rollout plan and the latency predictor read), then the base models
  (`tasks`); least recently used first within each. An entry is removed whole, its metadata
  first, so no half entry looks finished. An entry with a file being written (`*.tmp*`, younger
  than an hour) is left alone, and so are `tune`/`models`/`tasks` entries used in the last hour
  (a run that is still going may need them): the folder may stay over its limit while they are.
- **Concurrency.** A trim holds `cache/.trim.lock` (a process that finds another trimming skips
  its own cheap trim); files that vanish meanwhile are fine.
- **When.** `trim_caches()` at the end of a run; `note_written()` after each cache write keeps a
  running size estimate in the process and trims the rebuildable kinds when the folder is more
  than 10% over its limit.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from orchestrator.errors import ExitCode, OrchestratorError
from orchestrator.state.paths import state_dir

log = logging.getLogger(__name__)

LIMIT_ENV = "EDGE_ORCHESTRATOR_CACHE_MAX"
DEFAULT_LIMIT = 5 * 1024**3
#: Every kind of cache under `<state>/cache`, in the order they are given up (the tier decides first).
KINDS = ("stages", "accuracy", "tune", "models", "tasks")
TIER = {"stages": 0, "accuracy": 0, "tune": 0, "models": 1, "tasks": 2}
#: What a run may rebuild at will: the only kinds a trim in the middle of a run touches.
REBUILDABLE = ("stages", "accuracy", "tune")
#: Entries of these kinds used this recently may belong to a run that is still going.
IN_USE_S = {"tune": 3600.0, "models": 3600.0, "tasks": 3600.0}
#: A temporary file younger than this is being written; an older one was left by a crash.
TMP_FRESH_S = 3600.0
#: A write trims when the estimated size passes the limit by this factor.
SLACK = 1.10

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|b)?\s*", re.IGNORECASE)
_TMP = re.compile(r"\.tmp\d*$")


class CacheLimitError(OrchestratorError):
    """The cache size limit is not a size, or a cache kind is unknown."""

    exit_code = ExitCode.USAGE


def parse_size(text: str) -> int | None:
    """Bytes of a size such as `500M`, `2G`, `1.5GiB`, `1048576` (units are powers of 1024); None for `off`."""
    if text.strip().lower() in ("off", "none", "unlimited"):
        return None
    match = _SIZE.fullmatch(text)
    if not match:
        raise CacheLimitError(f"${LIMIT_ENV}={text!r} is not a size: give bytes or a number with K, M, G or T "
                              "(e.g. 500M, 2G, 1.5GiB), or 'off' for no limit")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def cache_limit() -> int | None:
    """The limit in bytes (`$EDGE_ORCHESTRATOR_CACHE_MAX`, else 5 GiB); None when it is `off`.

    Raises CacheLimitError when the variable is not a size: call it when a run starts to fail early."""
    text = os.environ.get(LIMIT_ENV)
    return DEFAULT_LIMIT if text is None or not text.strip() else parse_size(text)


def format_size(n: float) -> str:
    """`1.5 GiB`, `512 B`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cache_root() -> Path:
    """The cache folder, `<state>/cache` (not created here)."""
    return state_dir() / "cache"


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise CacheLimitError(f"unknown cache kind {kind!r}: the kinds are {', '.join(KINDS)}")
    return kind


# ------------------------------------------------------------------ entries


@dataclass
class Entry:
    """One cache entry: the files of one key (metadata first), or one sub-folder."""

    kind: str
    name: str
    paths: list[Path] = field(default_factory=list)
    size: int = 0
    last_use: float = 0.0
    busy: bool = False  # a file of it is being written
    folder: bool = False

    def in_use(self, now: float) -> bool:
        return self.busy or now - self.last_use < IN_USE_S.get(self.kind, 0.0)


def _stem(name: str) -> str:
    """The key a file belongs to: `.k.json.tmp12` -> `k`, `k.pt` -> `k`, `k.tmp12` -> `k`."""
    base = _TMP.sub("", name.lstrip("."))
    return base.rsplit(".", 1)[0] if "." in base else base


def _walk(folder: str) -> tuple[int, float]:
    """(bytes, newest modification time) of everything under a folder; vanishing files are skipped."""
    size, newest = 0, 0.0
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(top, name))
            except OSError:
                continue
            newest = max(newest, st.st_mtime)
            if name in files:
                size += st.st_size
    return size, newest


def scan(kind: str, root: Path | None = None) -> list[Entry]:
    """The entries of one kind (an empty list when its folder is missing)."""
    folder = (root or cache_root()) / kind
    entries: dict[str, Entry] = {}
    temps: dict[str, float] = {}  # newest temporary file of an entry
    now = time.time()
    try:
        children = list(os.scandir(folder))
    except OSError:
        return []
    for child in children:
        try:
            if child.is_dir(follow_symlinks=False):
                size, newest = _walk(child.path)
                newest = max(newest, child.stat(follow_symlinks=False).st_mtime)
                entries[child.name + "/"] = Entry(kind, child.name, [Path(child.path)], size, newest, folder=True)
                continue
            st = child.stat(follow_symlinks=False)
        except OSError:  # removed meanwhile
            continue
        entry = entries.setdefault(_stem(child.name), Entry(kind, _stem(child.name)))
        entry.paths.append(Path(child.path))
        entry.size += st.st_size
        if _TMP.search(child.name):
            entry.busy = entry.busy or now - st.st_mtime < TMP_FRESH_S
            temps[entry.name] = max(temps.get(entry.name, 0.0), st.st_mtime)
        else:
            entry.last_use = max(entry.last_use, st.st_mtime)
    for entry in entries.values():
        entry.paths.sort(key=lambda p: (p.suffix != ".json", p.name))  # metadata first
        entry.last_use = entry.last_use or temps.get(entry.name, 0.0)  # only temporary files
    return list(entries.values())


def remove(entry: Entry) -> bool:
    """Remove an entry whole, metadata first. True when nothing of it is left (another process's removal counts)."""
    if entry.folder:
        shutil.rmtree(entry.paths[0], ignore_errors=True)
        return not entry.paths[0].exists()
    for path in entry.paths:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cache: cannot remove %s: %s", path, exc.strerror or exc)
            return False
    return True


def touch(path: Path) -> None:
    """Mark an entry used now (its last use is its newest modification time); a read-only cache is fine."""
    try:
        os.utime(path)
    except OSError:
        pass


# ------------------------------------------------------------------ trimming


@dataclass
class TrimResult:
    limit: int | None
    before: int
    after: int
    removed: int = 0
    skipped: bool = False  # another process was trimming

    @property
    def freed(self) -> int:
        return self.before - self.after


@contextmanager
def _trim_lock(root: Path, wait: bool) -> Iterator[bool]:
    """Holds `cache/.trim.lock`; yields False (without waiting) when another process holds it and not `wait`."""
    try:
        import fcntl
    except ImportError:  # not POSIX: trims may overlap, which removal tolerates
        yield True
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".trim.lock", "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def usage(root: Path | None = None) -> int:
    """Bytes in the cache folder, all kinds."""
    return sum(e.size for kind in KINDS for e in scan(kind, root))


def trim(limit: int | None, kinds: Iterable[str] = KINDS, root: Path | None = None, wait: bool = True) -> TrimResult:
    """Remove least-recently-used entries of `kinds` (tier by tier, see the module) until the folder fits `limit`."""
    root = root or cache_root()
    kinds = tuple(kinds)
    with _trim_lock(root, wait) as held:
        entries = [e for kind in KINDS for e in scan(kind, root)]
        total = sum(e.size for e in entries)
        result = TrimResult(limit, total, total, skipped=not held)
        if not held or limit is None or total <= limit:
            return result
        now = time.time()
        for entry in sorted((e for e in entries if e.kind in kinds and not e.in_use(now)),
                            key=lambda e: (TIER[e.kind], e.last_use)):
            if result.after <= limit:
                break
            if remove(entry):
                result.after -= entry.size
                result.removed += 1
    log.info("cache: removed %d entries (%s); %s of %s", result.removed, format_size(result.freed),
             format_size(result.after), format_size(limit))
    if result.after > limit:
        log.warning("cache: %s is still over its limit of %s (the rest is in use or being written); "
                    "set $%s higher", format_size(result.after), format_size(limit), LIMIT_ENV)
    return result


def trim_caches(wait: bool = True) -> TrimResult:
    """Bring the cache folder within its limit (`$EDGE_ORCHESTRATOR_CACHE_MAX`): call when a run's search is over.

    Raises CacheLimitError when the variable is not a size."""
    return trim(cache_limit(), KINDS, wait=wait)


class _Estimate:
    """This process's running estimate of the cache folder's size (one scan, then what it wrote)."""

    lock: ClassVar[threading.Lock] = threading.Lock()
    by_root: ClassVar[dict[Path, _Estimate]] = {}
    warned: ClassVar[bool] = False

    def __init__(self, total: int) -> None:
        self.total = total
        self.floor = total  # what the last trim could not free: no new trim until the folder grew past it


def note_written(nbytes: int, root: Path | None = None) -> None:
    """After a cache write of `nbytes`: trims the rebuildable kinds when the folder is more than 10% over its limit.

    Cheap: the folder is scanned once per process, then only when a trim is due. Never raises."""
    try:
        limit = cache_limit()
    except CacheLimitError as exc:
        if not _Estimate.warned:
            _Estimate.warned = True
            log.warning("cache not trimmed: %s", exc)
        return
    if limit is None:
        return
    root = root or cache_root()
    try:
        with _Estimate.lock:
            estimate = _Estimate.by_root.get(root)
            if estimate is None:
                estimate = _Estimate.by_root[root] = _Estimate(usage(root))
            estimate.total += nbytes
            if estimate.total <= max(limit, estimate.floor) * SLACK:
                return
            result = trim(limit, REBUILDABLE, root, wait=False)
            if not result.skipped:
                estimate.total = estimate.floor = result.after
    except OSError as exc:  # the cache is a speed-up: a write never fails for its trim
        log.warning("cache not trimmed: %s", exc)


# ------------------------------------------------------------------ `orchestrate cache`


def info(root: Path | None = None) -> dict[str, dict[str, float | int | None]]:
    """Per kind: entries, bytes, oldest and newest last use (None when empty)."""
    out: dict[str, dict[str, float | int | None]] = {}
    for kind in KINDS:
        entries = scan(kind, root)
        uses = [e.last_use for e in entries if e.last_use]
        out[kind] = {"entries": len(entries), "bytes": sum(e.size for e in entries),
                     "oldest_use": min(uses) if uses else None, "newest_use": max(uses) if uses else None}
    return out


def clear(kinds: Iterable[str] = KINDS, root: Path | None = None) -> tuple[int, int, int]:
    """Remove every entry of `kinds` but those being written: (entries removed, bytes freed, entries left)."""
    removed = freed = left = 0
    for kind in kinds:
        for entry in scan(check_kind(kind), root):
            if entry.busy or not remove(entry):
                left += 1
                continue
            removed, freed = removed + 1, freed + entry.size
    with _Estimate.lock:
        _Estimate.by_root.pop(root or cache_root(), None)
    return removed, freed, left
