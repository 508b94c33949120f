"""An SSH connection to one device that accepts only the device's pinned host key (paramiko).

Key authentication only (a key file, else ssh-agent and the usual ~/.ssh keys); no password is
asked for, passed or stored. `SshSession` runs commands and opens SFTP; orchestrator/devices/ssh.py
builds the agent's transport on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import time
from typing import Iterator

import paramiko

log = logging.getLogger(__name__)

KEEPALIVE_S = 15

from orchestrator.devices.base import SshTarget
from orchestrator.devices.hostkeys import host_key_name, parse_host_key, reason
from orchestrator.errors import ConnectionLost, DeviceUnreachable, HostKeyMismatch, MeasurementError

# ---------------------------------------------------------------------------------------- a session


class _PinnedKeyOnly(paramiko.RejectPolicy):
    """RejectPolicy that remembers the key it refused (to name it in the error)."""

    offered: paramiko.PKey | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.offered = key
        super().missing_host_key(client, hostname, key)


class SshSession:
    """One authenticated SSH connection to a device whose host key matched the pinned one."""

    def __init__(self, name: str, target: SshTarget, client: paramiko.SSHClient) -> None:
        self.name, self.target, self.client = name, target, client
        self._sftp: paramiko.SFTPClient | None = None

    @classmethod
    def open(cls, name: str, target: SshTarget) -> SshSession:
        """Connect and authenticate; raises HostKeyMismatch or DeviceUnreachable with the reason."""
        pinned = parse_host_key(target.host_key)
        client = paramiko.SSHClient()
        policy = _PinnedKeyOnly()
        client.set_missing_host_key_policy(policy)
        client.get_host_keys().add(host_key_name(target.host, target.port), pinned.get_name(), pinned)
        key_path = os.path.expanduser(target.key_path) if target.key_path else None
        t = target.connect_timeout_s
        try:
            client.connect(
                target.host, target.port, username=target.user, key_filename=key_path,
                allow_agent=key_path is None, look_for_keys=key_path is None,
                timeout=t, banner_timeout=t, auth_timeout=t, channel_timeout=t,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise _changed_key(name, target, pinned, exc.key) from None
        except paramiko.PasswordRequiredException:
            client.close()
            raise DeviceUnreachable(
                f"device {name!r}: key {target.key_path} is protected by a passphrase; load it into ssh-agent "
                "(ssh-add) and register the device without --key") from None
        except paramiko.AuthenticationException:
            client.close()
            raise DeviceUnreachable(
                f"device {name!r}: {target.address} did not accept the key "
                f"({target.key_path or 'ssh-agent and ~/.ssh keys'})") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            if policy.offered is not None:  # the server no longer has a key of the pinned type
                raise _changed_key(name, target, pinned, policy.offered) from None
            raise DeviceUnreachable(f"device {name!r}: cannot connect to {target.address}: {reason(exc)}") from None
        client.get_transport().set_keepalive(KEEPALIVE_S)
        return cls(name, target, client)

    @property
    def active(self) -> bool:
        """Whether the connection is still up."""
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def close(self) -> None:
        """Close the connection (and its SFTP channel)."""
        with contextlib.suppress(Exception):
            if self._sftp is not None:
                self._sftp.close()
        self.client.close()

    @contextlib.contextmanager
    def sftp(self, doing: str) -> Iterator[paramiko.SFTPClient]:
        """The session's SFTP channel; errors name what was being done (ConnectionLost if the link is gone;
        a server that refuses the SFTP channel on a live connection has no SFTP subsystem)."""
        if self._sftp is None:
            try:
                self._sftp = self.client.open_sftp()
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if self._link_lost():
                    raise ConnectionLost(f"device {self.name!r}: connection lost while {doing} ({reason(exc)})") from None
                raise MeasurementError(
                    f"device {self.name!r}: the SSH server at {self.target.host}:{self.target.port} offers no SFTP "
                    "subsystem, which is needed to send the agent and models (enable `Subsystem sftp` in its "
                    "sshd_config)") from None
        try:
            yield self._sftp
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if not self.active or isinstance(exc, (paramiko.SSHException, EOFError, socket.timeout)):
                raise ConnectionLost(f"device {self.name!r}: connection lost while {doing} ({reason(exc)})") from None
            raise MeasurementError(f"device {self.name!r}: {doing}: {reason(exc)}") from None

    def _link_lost(self) -> bool:
        # paramiko closes the channels a moment before it marks the transport inactive
        for _ in range(20):
            if not self.active:
                return True
            time.sleep(0.05)
        return False

    def run(self, argv: list[str], timeout: float, what: str = "the command") -> tuple[int, bytes, bytes]:
        """Run a command (argv, quoted for the remote shell); returns (exit status, stdout, stderr).

        Stdin stays open until the command ends: a command started with the agent's
        `--exit-on-stdin-eof` stops when this side gives up or the connection drops.
        """
        try:
            channel = self.client.get_transport().open_session(timeout=self.target.connect_timeout_s)
            channel.exec_command(shlex.join(argv))
        except (paramiko.SSHException, EOFError, OSError, AttributeError) as exc:
            raise ConnectionLost(f"device {self.name!r}: connection lost starting {what} ({reason(exc)})") from None
        deadline = time.monotonic() + timeout
        out, err = bytearray(), bytearray()
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MeasurementError(f"device {self.name!r}: {what} did not finish within {timeout:.0f} s")
                channel.settimeout(min(remaining, 1.0))
                try:
                    data = channel.recv(1 << 16)
                except TimeoutError:
                    data = None
                while channel.recv_stderr_ready():  # keep the window open even if stderr is chatty
                    err += channel.recv_stderr(1 << 16)
                if data == b"":
                    break
                if data:
                    out += data
            channel.status_event.wait(max(deadline - time.monotonic(), 0.1))
            status = channel.exit_status if channel.exit_status_ready() else -1
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(1 << 16)
        finally:
            channel.close()
        if status == -1:  # closed with no exit status: the link went away, or a signal ended the command
            if self._link_lost():
                raise ConnectionLost(f"device {self.name!r}: connection lost during {what}")
            raise MeasurementError(f"device {self.name!r}: {what} was killed on the device (out of memory?)")
        return status, bytes(out), bytes(err)


def _changed_key(name: str, target: SshTarget, pinned: paramiko.PKey, offered: paramiko.PKey) -> HostKeyMismatch:
    return HostKeyMismatch(
        f"device {name!r}: host key of {target.host}:{target.port} has changed (pinned {pinned.get_name()} "
        f"{pinned.fingerprint}, offered {offered.get_name()} {offered.fingerprint}); refusing to connect. "
        f"If the device was reinstalled: orchestrate devices remove {name}, then register it again"
    )
