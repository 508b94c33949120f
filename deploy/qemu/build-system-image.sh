#!/usr/bin/env bash
# Build (or reuse) the full-system arm64 VM image of the emulated device and print its folder.
#
#   deploy/qemu/build-system-image.sh [DEST] [--force] [--quiet]
#
# DEST defaults to system-<recipe hash> next to the user-mode sysroot ($EDGE_ORCHESTRATOR_QEMU_CACHE,
# else $EDGE_ORCHESTRATOR_HOME/emulated). Nothing runs under emulation while building: the sysroot
# (deploy/qemu/build-user-sysroot.sh: python3, numpy, onnxruntime) is built or reused, a private apt
# configuration downloads bookworm's arm64 kernel (linux-image-arm64, bookworm-security when newer),
# openssh-server and busybox-static; the initramfs (busybox + virtio/ext4/9p modules in load order)
# is written here; the root is `mke2fs -d` of the sysroot + packages + busybox init + sshd config;
# the VM's host key and a client key are made with ssh-keygen. Needs apt-get, dpkg-deb, mke2fs,
# ssh-keygen, debian-archive-keyring; running it needs qemu-system-arm. The work is in
# orchestrator/emulation/system_image.py.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m orchestrator.emulation.system_vm build "$@"
