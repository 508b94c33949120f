"""The deploy folder on the device: its paths, its activation history, the atomic switch of `current`,
and the check that `current` is intact.

DEPENDENCY NOTE: runs on the edge device (see agents/kernel.py): the standard library, numpy,
onnxruntime and agents.kernel only; Python 3.9 syntax; no subprocess.

Layout under the deploy folder (``--root``, the device's remote folder, + ``deploy/``)::

    incoming/                  uploads in flight (the host writes them; install moves them away)
    versions/<sha256>/         one version: model.onnx, reference.npz, manifest.json, health.json
    current -> versions/<sha>  what the device's inference service loads (a relative symlink)
    state.json                 activation history, newest last (what rollback goes back along)
    health.json                the last health check of any version
    .lock                      one install / rollback at a time (flock)

Why a half-done install never leaves the device without a working model: a version folder only
appears by renaming a completely written temporary folder into place, after every file in it and
the folder itself were fsynced (a power cut cannot leave it with an empty model.onnx), and
``current`` is only ever switched by renaming a new symlink over it (``os.replace``), so at every
instant ``current`` names either the old complete version or the new complete one. ``state.json``
is rewritten the same way, and ``current`` wins when the two disagree after a crash.

And if the disk loses data anyway (a lying cache, a change by hand): ``current_version()`` accepts
``current`` only when its model.onnx still has the sha256 its manifest names; ``repair_current``
then falls back to the newest earlier version that is intact, and the commands report it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid

from agents.kernel import AgentError, ExitCode, file_sha256, one_line

try:
    import fcntl
except ImportError:  # not on Windows; the lock is then advisory only in name
    fcntl = None

DEPLOY_DIR = "deploy"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MODEL, REFERENCE, MANIFEST, HEALTH = "model.onnx", "reference.npz", "manifest.json", "health.json"
STALE_UPLOAD_S = 3600  # incoming files older than this are leftovers of an interrupted rollout

# sha256 of files already hashed by this process, by what would change if the file did: `watch`
# checks `current` every second, and hashing a large model each time would load the device.
_HASHED: dict = {}


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

    def linked_version(self) -> str | None:
        """The version the `current` symlink names, if it names a complete version folder (not verified)."""
        try:
            target = os.readlink(self.current)
        except OSError:
            return None
        name = os.path.basename(target.rstrip("/"))
        if not SHA256.match(name) or not os.path.isfile(os.path.join(self.versions, name, MANIFEST)):
            return None
        return name

    def current_version(self) -> str | None:
        """The version `current` names, if that version is intact (its model matches its manifest's sha256)."""
        linked = self.linked_version()
        return linked if linked is not None and version_problem(self, linked) is None else None

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


def inside(path: str, folder: str) -> str:
    """The real path of `path`, which must be a file directly in `folder` (USAGE error otherwise)."""
    real, base = os.path.realpath(path), os.path.realpath(folder)
    if os.path.dirname(real) != base:
        raise AgentError("%s is not a file in %s" % (path, folder), ExitCode.USAGE)
    return real


# -------------------------------------------------------------------------------------- durability


def fsync_file(path: str) -> None:
    """Flush a file's data to the disk; AgentError if the disk refuses (the install must not go on)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise AgentError("cannot flush %s to the disk: %s" % (path, one_line(exc)))


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (names created, renamed, removed) to the disk, where the OS can."""
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


def write_atomic(path: str, data: bytes) -> None:
    """Write a file by tmp + fsync + os.replace: readers see the old file or the new one, never half."""
    tmp = "%s.tmp-%s" % (path, uuid.uuid4().hex[:8])
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def read_json(path: str, default=None):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return default


@contextlib.contextmanager
def locked(layout: Layout):
    """One install / rollback / repair at a time on this deploy folder (flock; not re-entrant)."""
    os.makedirs(layout.root, mode=0o700, exist_ok=True)
    with open(os.path.join(layout.root, ".lock"), "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# -------------------------------------------------------------------------------------- integrity


def _hashed_sha256(path: str) -> str | None:
    """file_sha256, remembered by (inode, size, mtime, ctime) for this process; None if unreadable."""
    try:
        st = os.stat(path)
        key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in _HASHED:
            _HASHED[key] = file_sha256(path)
        return _HASHED[key]
    except OSError:
        return None


def version_problem(layout: Layout, version: str) -> str | None:
    """Why an installed version cannot be used (its files do not match its manifest), or None if intact."""
    folder = layout.version_dir(version)
    manifest = read_json(os.path.join(folder, MANIFEST))
    if not isinstance(manifest, dict) or manifest.get("sha256") != version:
        return "its manifest.json is unreadable or names another model"
    model = os.path.join(folder, MODEL)
    got = _hashed_sha256(model)
    if got is None:
        return "its model.onnx is missing or unreadable"
    if got != version:
        return ("its model.onnx (%d bytes, sha256 %s...) does not match the sha256 in its manifest (lost in a "
                "power cut, or changed on the device's disk)" % (os.path.getsize(model), got[:12]))
    return None


def repair_current(layout: Layout) -> dict | None:
    """If `current` names a version that is not intact, fall back to the newest intact version before it
    in the history (switched to as rollback would); the caller holds the lock.

    Returns None when `current` is intact (or absent), else what was found and done:
    ``{"version", "problem", "fell_back_to"}`` (``fell_back_to`` None: no earlier version is intact,
    `current` is left as it is, and current_version() stays None).
    """
    linked = layout.linked_version()
    problem = None if linked is None else version_problem(layout, linked)
    if problem is None:
        return None
    history = load_history(layout)
    installed = layout.installed()
    fallback = next((v for v in reversed(history)
                     if v != linked and v in installed and version_problem(layout, v) is None), None)
    note = {"version": linked, "problem": "version %s... is not intact: %s" % (linked[:12], problem),
            "fell_back_to": fallback}
    if fallback is not None:
        last = len(history) - 1 - history[::-1].index(fallback)
        save_history(layout, [v for v in history[:last + 1] if v != linked])  # first, as rollback does
        switch_current(layout, fallback)
    return note


def checked_current(layout: Layout) -> tuple[str | None, dict | None]:
    """The intact current version, after repair_current if `current` is not intact: (version, repair note)."""
    linked = layout.linked_version()
    if linked is None or version_problem(layout, linked) is None:
        return linked, None
    with locked(layout):
        note = repair_current(layout)
    return layout.current_version(), note


# ------------------------------------------------------------------------------------------ state


def load_history(layout: Layout) -> list[str]:
    """Activation history, newest last, reconciled with the `current` link (the truth after a crash)."""
    stored = (read_json(layout.state, {}) or {}).get("history", [])
    history = [v for v in stored if isinstance(v, str) and SHA256.match(v)]
    current = layout.linked_version()
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
    write_atomic(layout.state, json.dumps({"history": collapsed}).encode())


def switch_current(layout: Layout, version: str | None) -> None:
    """Point `current` at a version (None removes it), atomically: a new symlink renamed over the old one."""
    if version is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(layout.current)
    else:
        tmp = "%s.tmp-%s" % (layout.current, uuid.uuid4().hex[:8])
        os.symlink(os.path.join("versions", check_version(version)), tmp)
        os.replace(tmp, layout.current)
    fsync_dir(layout.root)


def summary(layout: Layout, version: str | None) -> dict | None:
    """What the host is told of a version: its manifest's fields and its last health check."""
    if version is None:
        return None
    manifest = read_json(os.path.join(layout.version_dir(version), MANIFEST), {}) or {}
    health = read_json(os.path.join(layout.version_dir(version), HEALTH))
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


def clean_leftovers(layout: Layout, keep_files: tuple = ()) -> None:
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
    """Keep the `keep` most recently activated versions (always the one `current` names); remove the others."""
    kept = []
    for v in reversed(history):
        if v not in kept and len(kept) < keep:
            kept.append(v)
    current = layout.linked_version()
    if current is not None and current not in kept:
        kept.append(current)
    removed = [v for v in layout.installed() if v not in kept]
    save_history(layout, [v for v in history if v in kept])
    for v in removed:  # rename first, so a crash never leaves a half-deleted folder under a version name
        trash = os.path.join(layout.versions, ".tmp-removed-%s-%s" % (v[:12], uuid.uuid4().hex[:6]))
        os.rename(layout.version_dir(v), trash)
        shutil.rmtree(trash, ignore_errors=True)
    return kept, removed
