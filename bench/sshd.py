"""A real OpenSSH server on 127.0.0.1 for the device tests and the benches: its own config, host key and client key.

Seen on this machine: sshd needs /run/sshd (its privilege-separation folder), needs
`StrictModes no` when its key files live under a world-writable folder such as /tmp,
and is best run as a child with `-D -e -f CONFIG` and stopped by its pid.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = "ssh-keygen"


def sshd_missing_reason() -> str | None:
    """Why a real sshd cannot run here, or None if it can."""
    if not SSHD.exists():
        return "/usr/sbin/sshd is missing: install openssh-server (`make test` does, as root on Debian)"
    if not Path("/run/sshd").is_dir() and os.geteuid() != 0:
        return "/run/sshd is missing and only root can create it"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path, kind: str = "ed25519") -> Path:
    """A new passphrase-less key pair at path / path.pub."""
    subprocess.run([SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", "eo-test", "-f", str(path)], check=True)
    return path


def fingerprint(pub: Path) -> str:
    """`SHA256:...` of a public key file, as `ssh-keygen -l` prints it."""
    out = subprocess.run([SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(pub)], check=True, capture_output=True, text=True)
    return out.stdout.split()[1]


class Sshd:
    """One sshd process on 127.0.0.1:port (the port stays the same across restart())."""

    def __init__(self, folder: Path, port: int | None = None, host_key_type: str = "ed25519",
                 sftp: bool = True) -> None:
        self.folder = folder
        self.sftp = sftp  # False: a server without the SFTP subsystem (no `Subsystem sftp` line)
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.user = getpass.getuser()
        self.host_key = keygen(folder / "host_key", host_key_type)
        self.client_key = folder / "client_key"
        if not self.client_key.exists():
            keygen(self.client_key)
        (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
        self.log = folder / "sshd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def host_key_fingerprint(self) -> str:
        """The fingerprint of the host key this server offers."""
        return fingerprint(self.folder / "host_key.pub")

    def _config(self) -> Path:
        config = self.folder / "sshd_config"
        config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.folder / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.folder / 'authorized_keys'}\n"
            "StrictModes no\n"  # the keys live under /tmp
            "UsePAM no\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            f"AllowUsers {self.user}\n"
            + ("Subsystem sftp internal-sftp\n" if self.sftp else "")
            + "MaxStartups 50\n"
            "LogLevel VERBOSE\n"
        )
        return config

    def start(self, timeout: float = 10.0) -> Sshd:
        """Start sshd and wait until it answers with an SSH banner."""
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(self._config())],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not answer on port {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self, leave_commands: bool = False) -> None:
        """Kill sshd and its per-connection processes by pid; also the commands they started unless `leave_commands`
        (as when sshd crashes: what it ran loses its connection and is left to notice)."""
        if self.proc is None:
            return
        try:
            family = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        if leave_commands:
            family = [p for p in family if _is_sshd(p)]
        for proc in family:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=5)
        self.proc.wait(timeout=5)
        self.proc = None

    def restart(self, new_host_key: bool = False, leave_commands: bool = False) -> Sshd:
        """Stop, optionally make a new host key (a reinstalled device, or another machine on the address), start."""
        self.stop(leave_commands)
        if new_host_key:
            for suffix in ("", ".pub"):
                (self.folder / f"host_key{suffix}").unlink()
            keygen(self.host_key)
        return self.start()


def _is_sshd(proc: psutil.Process) -> bool:
    try:
        return Path(proc.exe()).name.startswith("sshd")  # sshd, and sshd-session on OpenSSH 9.8+
    except psutil.Error:
        return False
