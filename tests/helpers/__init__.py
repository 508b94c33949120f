"""Helpers that several test modules share; test modules import from here, never from each other.

- `sshd`: a real OpenSSH server on 127.0.0.1 (its own config, host key, client key);
- `netns`: devices in their own network namespaces, behind a link a test can cut;
- `rollout`: small real models, real run records, a fleet of sshd devices (also bench/rollout.py);
- `browser`: headless Chromium reading back what a script in a page found;
- `qemu`: whether the Debian archive and PyPI can be reached, and the arm64 sysroot built once;
- `techniques`: a tiny digits context and the ONNX contract check for the technique tests;
- `agent`: tiny ONNX models and running the agent's command line in-process;
- `crash_agent`: the agent with a power cut at its K-th file-system change
  (`python -m tests.helpers.crash_agent K ...`, a script, never imported).

Fixtures that several test modules use live in tests/conftest.py (they may call these helpers).
Keep this module free of imports: `python -m tests.helpers.crash_agent` runs it first.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
