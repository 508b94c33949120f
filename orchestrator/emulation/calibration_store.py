"""Where a calibrated cost model is kept and read: `calibration/<profile>.json` in the state folder.

Written by `orchestrate devices calibrate` (orchestrator/emulation/calibrate.py); read by the profile's
emulated device through `icount.cost_model` (`stored_cost_model`). Kept apart from the fitting so the
reader imports nothing of the emulators.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.state.paths import state_dir

SCHEMA_VERSION = 1


def calibration_path(profile_name: str) -> Path:
    """Where the calibration of a profile's emulated device is kept."""
    return state_dir() / "calibration" / f"{profile_name}.json"


def load_calibration(profile_name: str) -> dict[str, Any] | None:
    """The stored calibration of a profile's emulated device, or None (none, or unreadable)."""
    try:
        data = json.loads(calibration_path(profile_name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("schema_version") == SCHEMA_VERSION else None


def save_calibration(record: dict[str, Any]) -> Path:
    """Store a calibration (written whole, then renamed into place)."""
    path = calibration_path(record["profile"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def stored_cost_model(profile: Any) -> dict[str, Any] | None:
    """The calibrated cost model (cpi, clock_mhz, intercept_ms, calibrated, source) stored for this profile's
    emulated device, or None. A calibration made for another CPU model than the profile's is not used."""
    record = load_calibration(profile.name)
    if record is None:
        return None
    emu = getattr(profile, "emulation", None)
    if emu is not None and record.get("qemu_cpu") not in (None, emu.qemu_cpu):
        return None
    return {"cpi": record["cpi"], "clock_mhz": record["clock_mhz"], "intercept_ms": record.get("intercept_ms", 0.0),
            "calibrated": True, "source": record["source"]}
