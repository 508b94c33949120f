"""Helpers that several test modules share; test modules import from here, never from each other.

- `netns`: devices in their own network namespaces, behind a link a test can cut;
- `rollout`: small real models, and fixtures for real run records and a fleet of sshd devices;
- `browser`: headless Chromium reading back what a script in a page found;
- `qemu`: whether the Debian archive and PyPI can be reached, and the arm64 sysroot built once;
- `techniques`: a tiny digits context and the ONNX contract check for the technique tests;
- `agent`: tiny ONNX models and running the agent's command line in-process;
- `crash_agent`: the agent with a power cut at its K-th file-system change
  (`python -m tests.helpers.crash_agent K ...`, a script, never imported).

Fixtures that several test modules use live in tests/conftest.py (they may call these helpers).
Helpers the benches share with the tests live in bench/ (a bench imports only the product and
bench/): `bench/sshd.py` (a real OpenSSH server on 127.0.0.1), `bench/fleet.py` (a fleet of them,
finished run records), `bench/models.py` (the tiny BERT).
Keep this module free of imports: `python -m tests.helpers.crash_agent` runs it first.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
