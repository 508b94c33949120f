"""The SSH transport: the agent on a device reached over SSH (paramiko).

Security: key authentication only (a key file, else ssh-agent and the usual ~/.ssh
keys); no password is asked for, passed or stored. The device's host key is pinned at
registration and is the only key a connection accepts: paramiko's `RejectPolicy` with
the pinned key loaded as the client's one known host key.

What goes to the device: the agent as one zipapp named by its code's hash
(orchestrator/devices/bundle.py) and models named by their sha256, both under the device's
remote folder. Each upload goes to a temporary name, the agent on the device checks its
sha256, and only then is it renamed into place; a name that is already there is not sent
again. Paths on the device are built here from the remote folder and hashes only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import shlex
import socket
import time
import uuid
import zipfile
from typing import Any, Callable, Iterator

import paramiko

from orchestrator.devices.base import OFFLINE_RETRY_S, Device, SshTarget, bench_args, compare_args
from orchestrator.devices.bundle import agent_bundle
from orchestrator.devices.hostkeys import host_key_name, parse_host_key, reason
from orchestrator.errors import ConnectionLost, DeviceOffline, DeviceUnreachable, HostKeyMismatch, MeasurementError
from orchestrator.profile import Profile

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 60.0  # info, sha256; a benchmark gets its profile's time budget on top
RECONNECT_DELAYS_S = (1.0, 2.0, 4.0)  # back-off after a lost connection, before the device is marked offline
KEEPALIVE_S = 15

#: Run by the device's own Python (`python -c CODE ARCHIVE`): one sha256 over the name and sha256 of
#: every file in a zip archive, or nothing and exit 1 if the archive cannot be read whole. It must
#: stay the same computation as `zip_content_sha256` below, and run on Python 3.9.
ZIP_CONTENT_SHA256 = (
    "import hashlib,sys,zipfile\n"
    "with zipfile.ZipFile(sys.argv[1]) as z:\n"
    "    d = hashlib.sha256()\n"
    "    for n in sorted(i.filename for i in z.infolist() if not i.is_dir()):\n"
    "        d.update(n.encode() + b'\\0' + hashlib.sha256(z.read(n)).digest())\n"
    "print(d.hexdigest())\n"
)


def zip_content_sha256(data: bytes) -> str:
    """What ZIP_CONTENT_SHA256 prints for an archive with these bytes (computed here, on the host)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        digest = hashlib.sha256()
        for n in sorted(i.filename for i in z.infolist() if not i.is_dir()):
            digest.update(n.encode() + b"\0" + hashlib.sha256(z.read(n)).digest())
    return digest.hexdigest()


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
        """The session's SFTP channel; errors name what was being done (ConnectionLost if the link is gone).

        A server that closes the SFTP channel at once while the connection stays up has no
        SFTP subsystem: that is said as such (MeasurementError), not as a lost connection.
        """
        if self._sftp is None:
            try:
                self._sftp = self.client.open_sftp()
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if self._link_lost():
                    raise ConnectionLost(
                        f"device {self.name!r}: connection lost while {doing} ({reason(exc)})") from None
                raise MeasurementError(
                    f"device {self.name!r}: the SSH server at {self.target.host}:{self.target.port} offers no SFTP subsystem, which "
                    "is needed to send the agent and models (enable `Subsystem sftp` in its sshd_config)") from None
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


# -------------------------------------------------------------------------------------- the transport


def bench_timeout_s(profile: Profile) -> float:
    """How long a benchmark may take: warm-up and timed runs each stop at the time budget, plus start-up."""
    return 2 * profile.measurement.time_budget_s + COMMAND_TIMEOUT_S


class SshTransport:
    """A registered device reached over SSH: ships the agent and models, runs the agent, reconnects with back-off."""

    def __init__(self, device: Device, reconnect_delays_s: tuple[float, ...] = RECONNECT_DELAYS_S) -> None:
        if device.ssh is None:
            raise ValueError(f"device {device.name} has no SSH target")
        self.device, self.target = device, device.ssh
        self.reconnect_delays_s = reconnect_delays_s
        self.session: SshSession | None = None
        self.offline_reason: str | None = None
        self._offline_since: float | None = None
        self._agent_path: str | None = None

    @property
    def name(self) -> str:
        """The device's name."""
        return self.device.name

    @property
    def offline(self) -> bool:
        """True once reconnecting failed; cleared by the next successful connection."""
        return self._offline_since is not None

    def remote_path(self, *parts: str) -> str:
        """A path under the device's remote folder ("~/x" and relative folders are under the login's home)."""
        root = self.target.remote_dir
        if root == "~" or root.startswith("~/"):
            root = root[2:] or "."
        return posixpath.join(root, *parts)

    # connection -------------------------------------------------------------------------------------

    def connect(self, retry: bool = True) -> SshSession:
        """The live session, connecting if needed.

        With `retry`, a failed connection is tried again after each of `reconnect_delays_s`
        before the device is marked offline (DeviceOffline); an offline device is tried
        again only after OFFLINE_RETRY_S. A changed host key is never retried.
        """
        if self.session is not None and self.session.active:
            return self.session
        self.close()
        if retry and self._offline_since is not None and time.monotonic() - self._offline_since < OFFLINE_RETRY_S:
            raise DeviceOffline(f"device {self.name!r} is offline: {self.offline_reason}")
        delays = (0.0, *self.reconnect_delays_s) if retry else (0.0,)
        last: DeviceUnreachable | None = None
        for delay in delays:
            time.sleep(delay)
            try:
                self.session = SshSession.open(self.name, self.target)
            except DeviceUnreachable as exc:
                last = exc
                log.info("%s", exc)
                continue
            self._offline_since = self.offline_reason = None
            self._agent_path = None
            return self.session
        assert last is not None
        if not retry:
            raise last
        self._offline_since = time.monotonic()
        self.offline_reason = f"{last} ({len(delays)} attempts over {sum(delays):.0f} s)"
        raise DeviceOffline(f"{last}; marked offline after {len(delays)} attempts over {sum(delays):.0f} s") from None

    def close(self) -> None:
        """Drop the connection (it is opened again when needed)."""
        if self.session is not None:
            self.session.close()
            self.session = None

    # agent and uploads ------------------------------------------------------------------------------

    def _agent(self, session: SshSession, agent: str, args: list[str], timeout: float) -> dict[str, Any]:
        argv = [*shlex.split(self.target.python), agent, *args]
        code, out, err = session.run(argv, timeout, what=f"the agent's {args[0]}")
        try:
            result = json.loads(out.decode(errors="replace").strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            tail = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise MeasurementError(
                f"device {self.name!r}: the agent did not run ({self.target.python} exited {code}: {tail}); "
                "the device needs Python 3.9+ with numpy and onnxruntime (see --python)") from None
        if code != 0 or "error" in result:
            raise MeasurementError(f"device {self.name!r}: {result.get('error', f'agent exited {code}')}")
        return result

    def _upload(self, sftp: paramiko.SFTPClient, data: bytes, path: str) -> None:
        """Write bytes to a file on the device."""
        sftp.putfo(io.BytesIO(data), path, file_size=len(data), confirm=True)

    def _install(self, session: SshSession, data: bytes, sha256: str, path: str, what: str,
                 checker: str | None, intact: Callable[[], bool] | None = None) -> bool:
        """Put `data` at `path` on the device unless an intact copy is there; True if it was sent.

        A file of another size is replaced; one of the same size is kept only if `intact()`
        says so (the agent's check: a same-size corrupt zipapp is replaced). A new copy goes
        to a temporary name, the agent (`checker`, or the file itself when it is the agent)
        checks its sha256 on the device, and only a match is renamed into place.
        """
        with session.sftp(f"checking {path}") as sftp:
            try:
                size = sftp.stat(path).st_size
            except FileNotFoundError:
                size = None
        if size == len(data) and (intact is None or intact()):
            return False
        with session.sftp(f"checking {path}") as sftp:
            if size is not None:
                with contextlib.suppress(FileNotFoundError):
                    sftp.remove(path)  # a torn, corrupt or foreign file under our name
                log.warning("device %s: %s at %s was damaged or foreign; replacing it", self.name, what, path)
            _makedirs(sftp, posixpath.dirname(path))
        tmp = f"{path}.part-{uuid.uuid4().hex[:8]}"
        try:
            with session.sftp(f"uploading {what}") as sftp:
                self._upload(sftp, data, tmp)
            got = self._agent(session, checker or tmp, ["sha256", "--file", tmp], COMMAND_TIMEOUT_S)["sha256"]
            if got != sha256:
                raise MeasurementError(
                    f"device {self.name!r}: {what} arrived corrupted (sha256 on the device {got[:16]}..., "
                    f"sent {sha256[:16]}...); the upload was discarded")
            with session.sftp(f"renaming {what} into place") as sftp:
                sftp.posix_rename(tmp, path)
        except BaseException:
            if session.active:
                with contextlib.suppress(Exception), session.sftp("removing a failed upload") as sftp:
                    sftp.remove(tmp)
            raise
        log.info("device %s: installed %s as %s", self.name, what, path)
        return True

    def _agent_intact(self, session: SshSession, path: str, data: bytes) -> bool:
        """Whether the agent zipapp at `path` on the device holds exactly the files of `data` (this host's bundle).

        Checked with the device's Python alone (a corrupt agent cannot check itself): the
        sha256 of every file in the archive, by name. Not the archive's own sha256: zip
        entries carry file times, so two hosts build different bytes for the same agent.
        """
        try:
            code, out, _ = session.run([*shlex.split(self.target.python), "-c", ZIP_CONTENT_SHA256, path],
                                       COMMAND_TIMEOUT_S, what="the agent's check")
        except MeasurementError as exc:
            if isinstance(exc, ConnectionLost):
                raise
            return False
        return code == 0 and out.decode(errors="replace").strip() == zip_content_sha256(data)

    def ensure_agent(self, session: SshSession) -> str:
        """The agent's path on the device, shipping it first if this code version is not there yet."""
        if self._agent_path is None:
            bundle = agent_bundle()
            path = self.remote_path(bundle.name)
            self._install(session, bundle.data, bundle.sha256, path, "the agent", checker=None,
                          intact=lambda: self._agent_intact(session, path, bundle.data))
            self._agent_path = path
        return self._agent_path

    def ensure_model(self, session: SshSession, model_bytes: bytes) -> tuple[str, str]:
        """(sha256, path on the device) of a model, uploading it unless it is already there."""
        sha = hashlib.sha256(model_bytes).hexdigest()
        path = self.remote_path("models", f"{sha}.onnx")
        self._install(session, model_bytes, sha, path, "the model", checker=self.ensure_agent(session))
        return sha, path

    # what the lease and the CLI call ----------------------------------------------------------------

    def ready(self) -> None:
        """Connect once (no retry) and make sure the agent is installed: the check at the start of a run."""
        self.ensure_agent(self.connect(retry=False))

    def info(self) -> dict[str, Any]:
        """The agent's `info` for the device (one connection attempt)."""
        session = self.connect(retry=False)
        return self._agent(session, self.ensure_agent(session), ["info"], COMMAND_TIMEOUT_S)

    def bench(self, model_bytes: bytes, profile: Profile) -> dict[str, Any]:
        """Measure one model with the profile's protocol; returns the agent's JSON.

        A connection lost mid-way fails this measurement (ConnectionLost, saying whether the
        device came back after reconnecting with back-off or is now offline).
        """
        session = self.connect()
        try:
            sha, path = self.ensure_model(session, model_bytes)
            args = ["bench", "--model", path, "--exit-on-stdin-eof", *bench_args(profile, None)]
            result = self._agent(session, self.ensure_agent(session), args, bench_timeout_s(profile))
        except ConnectionLost as exc:
            self.close()
            raise ConnectionLost(f"{exc}; {self._reconnect_after_loss()}") from None
        if result.get("model", {}).get("sha256") != sha:  # the file went bad on the device's disk
            with contextlib.suppress(Exception), session.sftp("removing a corrupt model") as sftp:
                sftp.remove(path)
            raise MeasurementError(
                f"device {self.name!r}: the stored model {sha[:16]}... no longer matches its sha256; "
                "removed (it is uploaded again next time)")
        return result

    def compare(self, models: list[bytes], profile: Profile) -> dict[str, Any]:
        """Measure several models together in interleaved rounds (the final round); returns the agent's JSON."""
        session = self.connect()
        try:
            stored = [self.ensure_model(session, data) for data in models]
            args = ["compare", *[a for _, path in stored for a in ("--model", path)], "--exit-on-stdin-eof",
                    *compare_args(profile, None)]
            timeout = 2 * profile.measurement.final_time_budget_s + len(models) * bench_timeout_s(profile)
            result = self._agent(session, self.ensure_agent(session), args, timeout)
        except ConnectionLost as exc:
            self.close()
            raise ConnectionLost(f"{exc}; {self._reconnect_after_loss()}") from None
        got = [m.get("sha256") for m in result.get("models", [])]
        if got != [sha for sha, _ in stored]:
            raise MeasurementError(f"device {self.name!r}: the final round measured other models than were sent")
        return result

    def _reconnect_after_loss(self) -> str:
        try:
            self.connect()
        except DeviceOffline as exc:
            return f"device marked offline: {exc}"
        except HostKeyMismatch as exc:
            return f"not reconnected: {exc}"
        return "reconnected"


def _makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    """mkdir -p over SFTP (mode 0700: only the login user reads the agent's folder)."""
    current = "/" if path.startswith("/") else ""
    for part in [p for p in path.split("/") if p and p != "."]:
        current = posixpath.join(current, part) if current else part
        try:
            sftp.stat(current)
        except FileNotFoundError:
            sftp.mkdir(current, mode=0o700)
