"""A run's files in OUT/<run-id>/: best.onnx (and its session settings), results.json and report.html."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from orchestrator.errors import DiskFull
from orchestrator.models.modelfacts import samples_npz, session_settings
from orchestrator.report.render import write_report
from orchestrator.state.paths import cache_dir
from orchestrator.state.store import SAMPLES_FILE, strict_json

FILES = ("best.onnx", "best.session.json", "results.json", "report.html")


def write_run_files(out: Path, results: dict[str, Any], best_sha256: str | None) -> None:
    """Write the run's files; on a full disk (or quota) remove any half-written one and raise DiskFull naming `out`,
    after setting `results`' status and message to say so (the caller stores the run `failed` with that line)."""
    try:
        if best_sha256 is not None:
            shutil.copyfile(cache_dir("models") / f"{best_sha256}.onnx", out / "best.onnx")
            settings = session_settings(out / "best.onnx")
            if settings is not None:  # what the device must run it with (plugins/session.py): also in the model
                (out / "best.session.json").write_text(json.dumps(settings, indent=2))
        (out / "results.json").write_text(strict_json(results, indent=2))  # never NaN/Infinity: not JSON
        write_report(results, out / "report.html")
    except OSError as exc:
        error = _disk_full(out, exc)
        results.update(status="failed", message=str(error))
        for name in FILES:  # none left half-written
            with contextlib.suppress(OSError):
                (out / name).unlink()
        raise error from None


def write_samples(out: Path, feeds: dict[str, Any] | None) -> None:
    """OUT/samples.npz: the held-out input rows the devices time and the rollout's health check feeds."""
    if not feeds:
        return
    tmp = out / f".{SAMPLES_FILE}.tmp"
    try:
        tmp.write_bytes(samples_npz(feeds))
        os.replace(tmp, out / SAMPLES_FILE)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _disk_full(out, exc, SAMPLES_FILE) from None


def _disk_full(out: Path, exc: OSError, writing: str | None = None) -> DiskFull:
    """DiskFull naming `out` for a full disk or quota; any other OSError is raised as it is."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise exc
    what = Path(exc.filename).name if exc.filename else writing or "its files"
    return DiskFull(f"{out}: no space left on the device ({what} could not be written); the run is marked "
                    "failed: free some space and run again")


def full_disk_during_run(exc: OSError, folders: list[Path]) -> DiskFull | None:
    """A full disk or quota met anywhere during a run (a cache, Ray Tune's state, a scratch file) as DiskFull
    naming the folder: the file's own when the error names it, else the first of `folders` (the state folder,
    the run's folder, the temporary folder) that has less than a megabyte left; None for any other OSError."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    if exc.filename:
        return _disk_full(Path(exc.filename).parent, exc)
    return _disk_full(next((f for f in folders if _nearly_full(f)), folders[0]), exc, "a file")


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False
