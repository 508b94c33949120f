"""The deploy folder on the device: its paths, its activation history and the atomic switch of `current`.

DEPENDENCY NOTE: runs on the edge device (see agents/agent.py): the standard library, numpy,
onnxruntime and agents.agent only; Python 3.9 syntax; no subprocess.

Layout under the deploy folder (``--root``, the device's remote folder, + ``deploy/``)::

    incoming/                  uploads in flight (the host writes them; install moves them away)
    versions/<sha256>/         one version: model.onnx, reference.npz, manifest.json, health.json
    current -> versions/<sha>  what the device's inference service loads (a relative symlink)
    state.json                 activation history, newest last (what rollback goes back along)
    health.json                the last health check of any version
    .lock                      one install / rollback at a time (flock)

Why a half-done install never leaves the device without a working model: a version folder only
appears by renaming a completely written (and fsynced) temporary folder into place, and
``current`` is only ever switched by renaming a new symlink over it (``os.replace``), so at every
instant ``current`` names either the old complete version or the new complete one. ``state.json``
is rewritten the same way, and ``current`` wins when the two disagree after a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid

from agents.agent import AgentError, ExitCode

try:
    import fcntl
except ImportError:  # not on Windows; the lock is then advisory only in name
    fcntl = None

DEPLOY_DIR = "deploy"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MODEL, REFERENCE, MANIFEST, HEALTH = "model.onnx", "reference.npz", "manifest.json", "health.json"
STALE_UPLOAD_S = 3600  # incoming files older than this are leftovers of an interrupted rollout


# ------------------------------------------------------------------------------------------ paths


class Layout:
    """The deploy folder's paths, all built here from --root and validated version names."""

    def __init__(self, root: str):
        self.root = os.path.join(os.path.abspath(os.path.expanduser(root)), DEPLOY_DIR)
        self.incoming = os.path.join(self.root, "incoming")
        self.versions = os.path.join(self.root, "versions")
        self.current = os.path.join(self.root, "current")
        self.state = os.path.join(self.root, "state.json")
        self.health = os.path.join(self.root, HEALTH)

    def version_dir(self, version: str) -> str:
        return os.path.join(self.versions, check_version(version))

    def current_version(self) -> str | None:
        """The version `current` points to, if it points to a complete version folder."""
        try:
            target = os.readlink(self.current)
        except OSError:
            return None
        name = os.path.basename(target.rstrip("/"))
        if not SHA256.match(name) or not os.path.isfile(os.path.join(self.versions, name, MANIFEST)):
            return None
        return name

    def installed(self) -> list[str]:
        """Complete version folders (a folder counts once its manifest is there; temp folders never count)."""
        try:
            names = os.listdir(self.versions)
        except OSError:
            return []
        return sorted(n for n in names if SHA256.match(n) and os.path.isfile(os.path.join(self.versions, n, MANIFEST)))


def check_version(name: str) -> str:
    """A version name is a sha256 in hex and nothing else (it becomes a path)."""
    if not isinstance(name, str) or not SHA256.match(name):
        raise AgentError("not a version name (64 hex digits): %r" % (name,), ExitCode.USAGE)
    return name


def _inside(path: str, folder: str) -> str:
    real, base = os.path.realpath(path), os.path.realpath(folder)
    if os.path.dirname(real) != base:
        raise AgentError("%s is not a file in %s" % (path, folder), ExitCode.USAGE)
    return real


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    """Write a file by tmp + fsync + os.replace: readers see the old file or the new one, never half."""
    tmp = "%s.tmp-%s" % (path, uuid.uuid4().hex[:8])
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _read_json(path: str, default=None):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return default


@contextlib.contextmanager
def _locked(layout: Layout):
    os.makedirs(layout.root, mode=0o700, exist_ok=True)
    with open(os.path.join(layout.root, ".lock"), "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------ state


def load_history(layout: Layout) -> list[str]:
    """Activation history, newest last, reconciled with `current` (the truth after a crash)."""
    stored = (_read_json(layout.state, {}) or {}).get("history", [])
    history = [v for v in stored if isinstance(v, str) and SHA256.match(v)]
    current = layout.current_version()
    if current is None:
        return [v for v in history if os.path.isdir(os.path.join(layout.versions, v))]
    if current in history:  # drop activations recorded but never switched to
        while history[-1] != current:
            history.pop()
    else:  # switched to but not recorded
        history.append(current)
    return history


def save_history(layout: Layout, history: list[str]) -> None:
    collapsed = []
    for v in history:
        if not collapsed or collapsed[-1] != v:
            collapsed.append(v)
    _write_atomic(layout.state, json.dumps({"history": collapsed}).encode())


def switch_current(layout: Layout, version: str | None) -> None:
    """Point `current` at a version (None removes it), atomically: a new symlink renamed over the old one."""
    if version is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(layout.current)
    else:
        tmp = "%s.tmp-%s" % (layout.current, uuid.uuid4().hex[:8])
        os.symlink(os.path.join("versions", check_version(version)), tmp)
        os.replace(tmp, layout.current)
    _fsync_dir(layout.root)


def summary(layout: Layout, version: str | None) -> dict | None:
    """What the host is told of a version: its manifest's fields and its last health check."""
    if version is None:
        return None
    manifest = _read_json(os.path.join(layout.version_dir(version), MANIFEST), {}) or {}
    health = _read_json(os.path.join(layout.version_dir(version), HEALTH))
    meta = manifest.get("meta") or {}
    return {
        "version": version,
        "installed_at": manifest.get("installed_at"),
        "run_id": meta.get("run_id"),
        "candidate": meta.get("candidate"),
        "label": meta.get("label"),
        "precision": (meta.get("health") or {}).get("precision"),
        "health": None if health is None else {k: health.get(k) for k in ("healthy", "checked_at", "reasons")},
    }


def _clean_leftovers(layout: Layout, keep_files: tuple = ()) -> None:
    """Remove what interrupted installs left: temp version folders, temp symlinks, stale uploads."""
    for folder in (layout.versions, layout.root):
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                if ".tmp-" in name:
                    path = os.path.join(folder, name)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            os.unlink(path)
    now = time.time()
    with contextlib.suppress(OSError):
        for name in os.listdir(layout.incoming):
            path = os.path.join(layout.incoming, name)
            if path not in keep_files:
                with contextlib.suppress(OSError):
                    if now - os.path.getmtime(path) > STALE_UPLOAD_S:
                        os.unlink(path)


def prune(layout: Layout, history: list[str], keep: int) -> tuple[list[str], list[str]]:
    """Keep the `keep` most recently activated versions (always `current`); remove the other folders."""
    kept = []
    for v in reversed(history):
        if v not in kept and len(kept) < keep:
            kept.append(v)
    current = layout.current_version()
    if current is not None and current not in kept:
        kept.append(current)
    removed = [v for v in layout.installed() if v not in kept]
    save_history(layout, [v for v in history if v in kept])
    for v in removed:  # rename first, so a crash never leaves a half-deleted folder under a version name
        trash = os.path.join(layout.versions, ".tmp-removed-%s-%s" % (v[:12], uuid.uuid4().hex[:6]))
        os.rename(layout.version_dir(v), trash)
        shutil.rmtree(trash, ignore_errors=True)
    return kept, removed
