"""Where state lives: registry, run store and caches, under the XDG data folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from orchestrator.errors import StateFileError

HOME_ENV = "EDGE_ORCHESTRATOR_HOME"


def _folder(path: Path, what: str) -> Path:
    """`path` made a folder if it is none yet; one clear error when it cannot be (a file there, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StateFileError(f"{path}: {what} is not a folder (a file is in the way)") from None
    except OSError as exc:
        raise StateFileError(f"{path}: cannot make {what}: {exc.strerror or exc}") from None
    return path


def state_dir() -> Path:
    """`$EDGE_ORCHESTRATOR_HOME`, else `$XDG_DATA_HOME/edge-orchestrator`, else `~/.local/share/edge-orchestrator`.

    A relative `$XDG_DATA_HOME` is ignored, as the XDG Base Directory spec says (it would make a store
    per working folder).
    """
    explicit = os.environ.get(HOME_ENV)
    if explicit:
        root, what = Path(explicit), f"the state folder (${HOME_ENV})"
    else:
        xdg = os.environ.get("XDG_DATA_HOME", "")
        if not os.path.isabs(xdg):
            xdg = str(Path.home() / ".local" / "share")
        root, what = Path(xdg) / "edge-orchestrator", "the state folder"
    return _folder(root, what).resolve()


def cache_dir(kind: str) -> Path:
    """A cache sub-folder (`tasks`, `models`, ...) under the state folder."""
    return _folder(state_dir() / "cache" / kind, f"the {kind} cache")


def store_path() -> Path:
    """The SQLite file holding runs and candidates."""
    return state_dir() / "runs.sqlite"


_swept: set[str] = set()


def _pid_namespace() -> str:
    """This process's pid namespace (Linux: the number in /proc/self/ns/pid), "0" where unknown."""
    try:
        return os.readlink("/proc/self/ns/pid").rsplit("[", 1)[-1].rstrip("]") or "0"
    except OSError:
        return "0"


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A temporary folder named `{prefix}{pid namespace}.{pid}-…` in the system's temp folder, removed
    when the block ends.

    A process killed while building (a trial cancelled at the run's end, `kill -9`, a crash) cannot
    remove its folder, and a transformer's copies are hundreds of MB: so the first call of each
    process removes this user's `{prefix}*` folders whose process is gone: named with this process's
    pid namespace (a container sharing the temp folder has another, and its pids mean nothing
    here) and a pid no process has. A live pid, another namespace, or another name is left alone.
    """
    namespace = _pid_namespace()
    if prefix not in _swept:
        _swept.add(prefix)
        for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
            owner = path.name[len(prefix):].split("-", 1)[0]
            space, _, pid = owner.partition(".")
            try:
                if space != namespace or not pid.isdigit() or path.is_symlink() or path.stat().st_uid != os.getuid():
                    continue
                os.kill(int(pid), 0)
            except ProcessLookupError:  # its process is gone
                shutil.rmtree(path, ignore_errors=True)
            except OSError:  # no permission to ask (another user's pid), or the folder went meanwhile
                continue
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{namespace}.{os.getpid()}-")
