#!/usr/bin/env bash
# Start, inspect or stop one full-system arm64 VM by hand (the image is built or reused first).
#
#   deploy/qemu/run-system-vm.sh start RUN_DIR [--cpu cortex-a72] [--cores 4] [--memory 2048] [--port P]
#   deploy/qemu/run-system-vm.sh status RUN_DIR
#   deploy/qemu/run-system-vm.sh stop RUN_DIR
#
# `start` runs qemu in the background (it keeps running after this script ends) and returns when
# the VM's sshd answers; RUN_DIR/vm.json records its pid, port and command, RUN_DIR/console.log
# its serial console. The command it runs (no KVM; -cpu from the profile, never max):
#
#   qemu-system-aarch64 -M virt -cpu cortex-a72 -smp 4 -m 2048 -nographic -no-reboot \
#     -kernel IMAGE/vmlinuz -initrd IMAGE/initrd.gz -append "console=ttyAMA0 panic=-1 loglevel=4" \
#     -drive file=IMAGE/rootfs.ext4,format=raw,if=none,id=hd0,snapshot=on -device virtio-blk-pci,drive=hd0 \
#     -netdev user,id=n0,hostfwd=tcp:127.0.0.1:PORT-:22 -device virtio-net-pci,netdev=n0,romfile= \
#     -device virtio-rng-pci
#
# It prints the ssh line to log in (root, IMAGE/keys/client_ed25519, the host key pinned).
# `orchestrate devices emulate PROFILE --mode system` does the same and registers the VM.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
what="${1:?start|status|stop RUN_DIR}"; dir="${2:?RUN_DIR}"; shift 2
exec "$python" -m orchestrator.emulation.system_vm "$what" --dir "$dir" "$@"
