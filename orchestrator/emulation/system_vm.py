"""The full-system emulated device's VM: start qemu-system-aarch64 on a built image, wait for SSH, attach, stop.

`python -m orchestrator.emulation.system_vm build|start|status|stop` drives it by hand.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.emulation.sysroot import (
    SysrootBuildError,
)
from orchestrator.emulation.system_image import (
    CLIENT_KEY,
    GUEST_USER,
    HOST_KEY,
    INITRD_FILE,
    KERNEL_FILE,
    QEMU_SYSTEM_BINARY,
    ROOTFS_FILE,
    VmError,
    build_system_image,
    key_fingerprint_of,
    qemu_system_binary,
    read_system_manifest,
)

BOOT_TIMEOUT_S = 600.0  # SSH answered 12 s after start on a quiet 2-core machine; much longer under load
VM_STATE = "vm.json"
CONSOLE_LOG = "console.log"


# ------------------------------------------------------------------------------------------- the VM


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no console output)"
    rows = [r for r in text.replace("\r", "").splitlines() if r.strip()]
    return "\n".join(rows[-lines:]) or "(no console output)"


class QemuSystemVM:
    """One VM of an image, a child process on a free loopback port; its state in `run_dir/vm.json`.

    `start()` returns once sshd answers on the forwarded port (or raises VmError with the
    console's tail); `stop()` ends it by its pid (checked to be this VM's qemu first).
    A VM started by one process can be stopped by another: `QemuSystemVM.attach(run_dir)`.
    """

    def __init__(self, image: Path | str, run_dir: Path | str, qemu_cpu: str = "cortex-a72", cores: int = 4,
                 memory_mb: int = 2048, port: int | None = None) -> None:
        self.image = Path(image).resolve()
        self.run_dir = Path(run_dir).resolve()
        self.qemu_cpu, self.cores, self.memory_mb = qemu_cpu, cores, memory_mb
        self.port = port
        self.pid: int | None = None
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.ssh_seconds: float | None = None

    # what a registration needs -------------------------------------------------------------------

    @property
    def host_key(self) -> str:
        """The VM's public host key, `TYPE BASE64` (generated on this host when the image was built)."""
        return " ".join((self.image / (HOST_KEY + ".pub")).read_text().split()[:2])

    @property
    def host_key_fingerprint(self) -> str:
        return key_fingerprint_of(self.image / (HOST_KEY + ".pub"))

    @property
    def client_key(self) -> Path:
        return self.image / CLIENT_KEY

    @property
    def console_log(self) -> Path:
        return self.run_dir / CONSOLE_LOG

    def command(self) -> list[str]:
        """The qemu-system-aarch64 command line (no KVM: TCG on any host)."""
        binary = qemu_system_binary() or QEMU_SYSTEM_BINARY
        return [
            binary, "-M", "virt", "-cpu", self.qemu_cpu, "-smp", str(self.cores), "-m", str(self.memory_mb),
            "-nographic", "-no-reboot", "-name", f"edge-orchestrator-vm,process=eo-vm-{self.port}",
            "-kernel", str(self.image / KERNEL_FILE), "-initrd", str(self.image / INITRD_FILE),
            "-append", "console=ttyAMA0 panic=-1 loglevel=4",
            "-drive", f"file={self.image / ROOTFS_FILE},format=raw,if=none,id=hd0,snapshot=on",
            "-device", "virtio-blk-pci,drive=hd0",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device", "virtio-net-pci,netdev=n0,romfile=",
            "-device", "virtio-rng-pci",
        ]

    # lifecycle -----------------------------------------------------------------------------------

    def start(self, timeout_s: float = BOOT_TIMEOUT_S) -> QemuSystemVM:
        """Start the VM in the background (its own session: it outlives this process) and wait for SSH."""
        if qemu_system_binary() is None:
            raise VmError("qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)")
        if read_system_manifest(self.image) is None:
            raise VmError(f"{self.image} is not a finished VM image (deploy/qemu/build-system-image.sh)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # the free port can be taken between choosing it and qemu binding it
            self.port = self.port if attempt == 0 and self.port else free_port()
            self.started_at = time.time()
            with open(self.console_log, "wb") as log:
                self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             start_new_session=True, cwd=self.run_dir)
            self.pid = self.proc.pid
            self._save()
            time.sleep(1.0)
            if self.proc.poll() is None or "hostfwd" not in _tail(self.console_log):
                break
        try:
            self.wait_for_ssh(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.ssh_seconds = round(time.time() - self.started_at, 1)
        self._save()
        return self

    def _alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and _is_our_qemu(self.pid, self.port)

    def wait_for_ssh(self, timeout_s: float) -> None:
        """Until sshd in the VM sends its banner through the forwarded port."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._alive():
                code = self.proc.returncode if self.proc is not None else "?"
                raise VmError(f"the VM exited (status {code}) before SSH answered; console:\n{_tail(self.console_log)}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=3) as sock:
                    sock.settimeout(5)
                    if sock.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise VmError(f"the VM's sshd did not answer on 127.0.0.1:{self.port} within {timeout_s:.0f} s; "
                      f"console:\n{_tail(self.console_log)}")

    def stop(self, timeout_s: float = 20.0) -> bool:
        """Stop the VM by its pid (SIGTERM, then SIGKILL); True if it was running. Nothing is left running."""
        import psutil

        if self.pid is None:
            return False
        if self.proc is None and not _is_our_qemu(self.pid, self.port):
            self.pid = None
            self._save()
            return False
        try:
            proc = psutil.Process(self.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
        except psutil.NoSuchProcess:
            pass
        if self.proc is not None:
            self.proc.wait(timeout_s)  # reap our child
        self.pid = None
        self._save()
        return True

    def status(self) -> dict[str, Any]:
        """What vm.json says, and whether its qemu is running now."""
        return {**self._state(), "running": self.pid is not None and self._alive()}

    def _state(self) -> dict[str, Any]:
        return {"image": str(self.image), "pid": self.pid, "port": self.port, "qemu_cpu": self.qemu_cpu,
                "cores": self.cores, "memory_mb": self.memory_mb, "started_at": self.started_at,
                "ssh_seconds": self.ssh_seconds, "console_log": str(self.console_log),
                "host_key_fingerprint": self.host_key_fingerprint, "user": GUEST_USER,
                "client_key": str(self.client_key), "command": self.command()}

    def _save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / f".{VM_STATE}.tmp"
        tmp.write_text(json.dumps(self._state(), indent=2) + "\n")
        tmp.rename(self.run_dir / VM_STATE)

    @classmethod
    def attach(cls, run_dir: Path | str) -> QemuSystemVM:
        """The VM recorded in `run_dir/vm.json` (started by this or another process)."""
        run_dir = Path(run_dir)
        try:
            state = json.loads((run_dir / VM_STATE).read_text())
        except (OSError, ValueError):
            raise VmError(f"no VM recorded in {run_dir}") from None
        vm = cls(state["image"], run_dir, state["qemu_cpu"], state["cores"], state["memory_mb"], state["port"])
        vm.pid, vm.started_at, vm.ssh_seconds = state.get("pid"), state.get("started_at"), state.get("ssh_seconds")
        return vm


def _is_our_qemu(pid: int, port: int | None) -> bool:
    """Whether `pid` is a qemu-system-aarch64 forwarding `port` (a recorded pid may have been reused)."""
    import psutil

    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return bool(cmdline) and Path(cmdline[0]).name == QEMU_SYSTEM_BINARY and \
        any(f"hostfwd=tcp:127.0.0.1:{port}-:22" in arg for arg in cmdline)


def main(argv: list[str] | None = None) -> int:
    """`python -m orchestrator.emulation.system_vm build|start|status|stop`: the VM by hand."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.emulation.system_vm", description=main.__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("build", help="build (or reuse) the VM image; prints its path")
    b.add_argument("dest", nargs="?")
    b.add_argument("--force", action="store_true")
    b.add_argument("--quiet", action="store_true")
    s = sub.add_parser("start", help="start a VM in the background, wait for SSH, print how to reach it")
    s.add_argument("--dir", required=True, help="the VM's run folder (vm.json, console.log)")
    s.add_argument("--image", help="a built image (default: built or reused)")
    s.add_argument("--cpu", default="cortex-a72")
    s.add_argument("--cores", type=int, default=4)
    s.add_argument("--memory", type=int, default=2048, help="MB")
    s.add_argument("--port", type=int, help="host port forwarded to the VM's 22 (default: a free one)")
    s.add_argument("--timeout", type=float, default=BOOT_TIMEOUT_S)
    for name in ("status", "stop"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    say = (lambda m: None) if getattr(args, "quiet", False) else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        if args.what == "build":
            print(build_system_image(args.dest, force=args.force, log=say))
        elif args.what == "start":
            image = args.image or build_system_image(log=say)
            vm = QemuSystemVM(image, args.dir, args.cpu, args.cores, args.memory, args.port).start(args.timeout)
            print(json.dumps(vm.status(), indent=2))
            say(f"SSH answered {vm.ssh_seconds} s after start; it keeps running until "
                f"`python -m orchestrator.emulation.system_vm stop --dir {args.dir}`:\n"
                f"  ssh -i {vm.client_key} -p {vm.port} -o StrictHostKeyChecking=yes "
                f"-o UserKnownHostsFile=<(echo '[127.0.0.1]:{vm.port} {vm.host_key}') {GUEST_USER}@127.0.0.1")
        elif args.what == "status":
            print(json.dumps(QemuSystemVM.attach(args.dir).status(), indent=2))
        else:
            vm = QemuSystemVM.attach(args.dir)
            print("stopped" if vm.stop() else "not running")
    except SysrootBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
