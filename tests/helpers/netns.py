"""Devices in their own network namespaces: an sshd behind a veth pair that a test can unplug.

    host: veth <host_if> 10.213.<i>.1/30  <->  netns <ns>: veth <ns_if> 10.213.<i>.2/30, sshd listening there

`cut()` takes the device's end of the link down: packets to it are dropped, open TCP connections
hang (no reset, as when a cable is pulled or Wi-Fi drops) and new ones time out. `restore()`
brings it back. Needs `ip netns` (root or CAP_NET_ADMIN); `netns_missing_reason()` tries it for
real.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

from bench.sshd import SSHD, Sshd, sshd_missing_reason


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def netns_missing_reason() -> str | None:
    """Why devices cannot get network namespaces here (a real attempt: add a namespace and a veth pair), or None."""
    why = sshd_missing_reason()
    if why:
        return why
    probe = f"eo-probe-{os.getpid()}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is missing"
    if made.returncode != 0:
        return f"`ip netns add` failed (needs root or CAP_NET_ADMIN): {made.stderr.strip()}"
    try:
        veth = _ip("link", "add", f"eopv{os.getpid() % 100000}", "type", "veth", "peer", "name",
                   f"eopn{os.getpid() % 100000}", "netns", probe, check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair into a namespace: {veth.stderr.strip()}"
    finally:
        _ip("link", "del", f"eopv{os.getpid() % 100000}", check=False)
        _ip("netns", "del", probe, check=False)
    return None


class NetnsLink:
    """A network namespace joined to the host by a veth pair (index picks the /30 subnet)."""

    def __init__(self, index: int) -> None:
        tag = uuid.uuid4().hex[:5]
        self.ns = f"eo-{tag}-{index}"
        self.host_if, self.ns_if = f"eoh{tag}{index}", f"eon{tag}{index}"  # at most 15 characters
        subnet = (os.getpid() % 200 + index) % 250 + 1
        self.host_ip, self.address = f"10.213.{subnet}.1", f"10.213.{subnet}.2"

    def up(self) -> NetnsLink:
        """Create the namespace and the link, addresses and routes."""
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.ns)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        for args in (("addr", "add", f"{self.address}/30", "dev", self.ns_if), ("link", "set", self.ns_if, "up"),
                     ("link", "set", "lo", "up")):
            _ip("netns", "exec", self.ns, "ip", *args)
        return self

    def cut(self) -> None:
        """Unplug at the device's end: packets to it are dropped, open connections hang, new ones time out."""
        _ip("netns", "exec", self.ns, "ip", "link", "set", self.ns_if, "down")

    def restore(self) -> None:
        """Plug back in."""
        _ip("netns", "exec", self.ns, "ip", "link", "set", self.ns_if, "up")

    def down(self) -> None:
        """Remove the namespace (and with it both ends of the link)."""
        _ip("netns", "del", self.ns, check=False)
        _ip("link", "del", self.host_if, check=False)


class NetnsSshd(Sshd):
    """An sshd running inside a network namespace, listening on its address there."""

    def __init__(self, folder: Path, link: NetnsLink) -> None:
        super().__init__(folder)
        self.link, self.address = link, link.address

    def _config(self) -> Path:
        config = super()._config()
        config.write_text(config.read_text().replace("ListenAddress 127.0.0.1", f"ListenAddress {self.address}"))
        return config

    def start(self, timeout: float = 10.0) -> NetnsSshd:
        """Start sshd in the namespace (`ip netns exec` execs it: same pid) and wait for its banner."""
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.link.ns, str(SSHD), "-D", "-e", "-f",
                                          str(self._config())], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.address, self.port), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not answer on {self.address}:{self.port}: {self.log.read_text()[-2000:]}")
