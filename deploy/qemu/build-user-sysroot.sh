#!/usr/bin/env bash
# Build (or reuse) the arm64 sysroot of the QEMU user-mode emulated device and print its path.
#
#   deploy/qemu/build-user-sysroot.sh [DEST] [--force] [--quiet]
#
# DEST defaults to $EDGE_ORCHESTRATOR_HOME/emulated/sysroot-<recipe hash>. Nothing runs under
# emulation while building: a private apt configuration (inside the build folder) downloads
# bookworm's arm64 python3, libstdc++6 and libgomp1, `dpkg -x` unpacks them, pip downloads the
# aarch64 numpy and onnxruntime wheels. Needs apt-get, dpkg-deb, debian-archive-keyring, and
# the Debian archive and PyPI reachable; running it needs qemu-user-static. The work is in
# orchestrator/emulation/sysroot.py.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m orchestrator.emulation.sysroot "$@"
