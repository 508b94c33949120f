"""The agent's peak memory is its own, not that of the process that started it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.agent import tiny_cnn

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_is_not_inherited_from_a_big_parent(tmp_path):
    # On Linux, getrusage's ru_maxrss carries the parent's peak across execve: a 300 MB parent
    # made a ~60 MB agent report 300 MB.
    model = tiny_cnn(tmp_path / "tiny.onnx")
    big = bytearray(300 * 2**20)
    big[::4096] = b"\1" * len(big[::4096])  # touch every page: the parent's RSS is now over 300 MB
    proc = subprocess.run([sys.executable, "-m", "agents", "bench", "--model", str(model), "--runs", "5",
                           "--warmup", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    del big
    out = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    assert 0 < out["peak_memory_mb"] < 250
