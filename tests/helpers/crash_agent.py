"""Run the agent, but have the kernel kill it (SIGKILL) just before its K-th change to the file system.

    python -m tests.helpers.crash_agent K install --root ... (the agent's arguments)

A power cut at a chosen point: no `finally`, no cleanup, no flush runs, exactly as when a
device loses power or the OOM killer strikes. The changes counted are the ones an install or a
rollback makes: mkdir, rename/replace, symlink, unlink/remove, rmtree. Exits as the agent does
if it finishes before its K-th change (the test's signal that every point was covered).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys

from agents.cli import main  # imported before the patches: only the command's own changes count

KILL_AT = int(sys.argv[1])
_count = 0


def _counted(fn):
    def changed(*args, **kwargs):
        global _count
        _count += 1
        if _count == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return changed


for _name in ("mkdir", "rename", "replace", "symlink", "unlink", "remove"):
    setattr(os, _name, _counted(getattr(os, _name)))
shutil.rmtree = _counted(shutil.rmtree)

raise SystemExit(main(sys.argv[2:]))
