"""Where state lives: registry, run store and caches, under the XDG data folder."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "EDGE_ORCHESTRATOR_HOME"


def state_dir() -> Path:
    """`$EDGE_ORCHESTRATOR_HOME`, else `$XDG_DATA_HOME/edge-orchestrator`, else `~/.local/share/edge-orchestrator`."""
    explicit = os.environ.get(HOME_ENV)
    if explicit:
        root = Path(explicit)
    else:
        xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        root = Path(xdg) / "edge-orchestrator"
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def cache_dir(kind: str) -> Path:
    """A cache sub-folder (`tasks`, `models`, ...) under the state folder."""
    path = state_dir() / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def store_path() -> Path:
    """The SQLite file holding runs and candidates."""
    return state_dir() / "runs.sqlite"
