"""The agent as one file: a zipapp of `agents/`, named by the hash of its code, shipped to devices once.

The name comes from the agent's source files, not from the archive's bytes (zip entries
carry file times), so every host builds the same name for the same agent code and a
device that already has it is not sent it again.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import zipapp
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import agents

# The archive's entry point: the agent's exit code must reach the caller, which
# zipapp's own `main=` template drops (it does not pass main()'s return to SystemExit).
MAIN_PY = "from agents.cli import main\n\nraise SystemExit(main())\n"


@dataclass(frozen=True)
class AgentBundle:
    """The agent zipapp: its file name on a device, its bytes, and their sha256."""

    name: str
    data: bytes
    sha256: str


def agent_sources() -> dict[str, bytes]:
    """The files that make up the agent: `agents/**/*.py` plus the archive's `__main__.py`, by archive path."""
    folder = Path(agents.__file__).resolve().parent
    files = {f"agents/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in sorted(folder.rglob("*.py"))}
    files["__main__.py"] = MAIN_PY.encode()
    return files


@lru_cache(maxsize=1)
def agent_bundle() -> AgentBundle:
    """Build the agent zipapp (once per process) with the standard library's `zipapp`."""
    sources = agent_sources()
    digest = hashlib.sha256()
    for path in sorted(sources):
        digest.update(path.encode() + b"\0" + hashlib.sha256(sources[path]).digest())
    with tempfile.TemporaryDirectory(prefix="eo-agent-") as tmp:
        for path, data in sources.items():
            target = Path(tmp, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        buf = io.BytesIO()
        # No interpreter line: the device's Python is always named explicitly (`--python`).
        zipapp.create_archive(tmp, buf, compressed=True, filter=lambda p: p.suffix == ".py")
    data = buf.getvalue()
    return AgentBundle(f"agent-{digest.hexdigest()[:16]}.pyz", data, hashlib.sha256(data).hexdigest())
