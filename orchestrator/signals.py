"""SIGTERM handled as Ctrl-C is (`kill PID`, `systemctl stop`, a CI job's timeout): the run stops, every
candidate measured so far is kept, the run is marked `interrupted` and `--resume` goes on with it.

Without this, SIGTERM ended the process at once (before Ray starts) or through Ray's own handler
(`sys.exit` from `ray.init`'s SIGTERM handler, and a core dump on the way out), leaving the run
`running` in the store for ever. `ray.init` installs its handler over ours: `retake_sigterm()`
after it puts ours back.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_state = {"installed": False, "received": False}


def _on_sigterm(signum: int, frame: Any) -> None:
    _state["received"] = True
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not _on_sigterm:
        # the Ctrl-C handler in place: the search's (it remembers the interrupt where Python would drop
        # it in one of Ray's finalizers) or Python's own; either raises KeyboardInterrupt
        handler(signal.SIGINT, frame)
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM raises KeyboardInterrupt as Ctrl-C does."""
    if not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _state["installed"], _state["received"] = True, False
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _state["installed"] = False


def retake_sigterm() -> None:
    """Put the handler back after something replaced it (`ray.init` does); nothing when none was installed."""
    if _state["installed"] and _main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def terminated() -> bool:
    """Whether the interrupt that stopped the last block was a SIGTERM (not a Ctrl-C)."""
    return bool(_state["received"])
