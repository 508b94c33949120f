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
import posixpath
import time
import uuid
import zipfile
from typing import Any, Callable

import paramiko

from orchestrator.config.profile import Profile
from orchestrator.devices.base import OFFLINE_RETRY_S, Device, bench_args, compare_args
from orchestrator.devices.bundle import agent_bundle
from orchestrator.devices.ssh_session import SshSession
from orchestrator.errors import ConnectionLost, DeviceOffline, DeviceUnreachable, HostKeyMismatch, MeasurementError

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 60.0  # info, sha256; a benchmark gets its profile's time budget on top
RECONNECT_DELAYS_S = (1.0, 2.0, 4.0)  # back-off after a lost connection, before the device is marked offline

#: One sha256 over the name and sha256 of every file of a zip archive, printed by the device's own
#: Python (`python -c CODE ARCHIVE`, 3.9+); zip_content_sha256 is the same on the host.
ZIP_CONTENT_SHA256 = ("import hashlib, sys, zipfile\nz = zipfile.ZipFile(sys.argv[1])\n"
                      "print(hashlib.sha256(b''.join(n.encode() + b'\\0' + hashlib.sha256(z.read(n)).digest() "
                      "for n in sorted(i.filename for i in z.infolist() if not i.is_dir()))).hexdigest())\n")


def zip_content_sha256(data: bytes) -> str:
    """What ZIP_CONTENT_SHA256 prints for an archive with these bytes."""
    z = zipfile.ZipFile(io.BytesIO(data))
    return hashlib.sha256(b"".join(n.encode() + b"\0" + hashlib.sha256(z.read(n)).digest()
                                   for n in sorted(i.filename for i in z.infolist() if not i.is_dir()))).hexdigest()


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
        argv = [self.target.python, agent, *args]  # --python is a path, spaces and all: quoted by session.run
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
        """Put `data` at `path` on the device unless a file of that size is there that `intact()` (if given)
        accepts; True if it was sent. It goes to a temporary name, the agent (`checker`, or the file itself
        when it is the agent) checks its sha256 on the device, and only a match is renamed into place.
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
            makedirs(sftp, posixpath.dirname(path))
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
        """Whether the agent zipapp at `path` holds exactly the files of this host's (`data`), checked by the device's
        Python alone (a corrupt agent cannot check itself). Not by the archive's own sha256: zip entries
        carry file times, so two hosts build different bytes for the same agent."""
        try:
            code, out, _ = session.run([self.target.python, "-c", ZIP_CONTENT_SHA256, path],
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


def makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    """mkdir -p over SFTP (mode 0700: only the login user reads the agent's folder)."""
    current = "/" if path.startswith("/") else ""
    for part in [p for p in path.split("/") if p and p != "."]:
        current = posixpath.join(current, part) if current else part
        try:
            sftp.stat(current)
        except FileNotFoundError:
            sftp.mkdir(current, mode=0o700)
