"""The `ssh` transport's deploy capability (`Deployable`): one device as the rollout drives it over SSH:
upload, install, health, rollback, status.

Built on SshTransport (pinned host key, the agent zipapp shipped by hash). Uploads go to
`<remote dir>/deploy/incoming/` under temporary names; the agent's `install` checks their
sha256 and moves them into place (agents/deploy.py). Every path on the device is built here
from the remote folder, hashes and fixed names; what the agent answers is validated (version
names must be sha256 hex, text fields are cut short and stripped of control characters)
before anything is stored or used.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import re
import uuid
from typing import Any

from orchestrator.devices.base import Device
from orchestrator.devices.registry import RegisteredDevice
from orchestrator.devices.ssh import SshTransport, makedirs
from orchestrator.devices.ssh_session import SshSession
from orchestrator.errors import MeasurementError

SHA256 = re.compile(r"^[0-9a-f]{64}$")
STABLE_AGENT_NAME = "agent.pyz"  # a symlink to the current agent zipapp, for the systemd unit
_TEXT_FIELDS = ("run_id", "candidate", "label", "precision")


class DeployTarget(SshTransport):
    """The rollout's side of one device. One connection, used by one thread at a time."""

    def __init__(self, device: Device | RegisteredDevice, command_timeout_s: float = 120.0,
                 connect_timeout_s: float | None = None) -> None:
        target = device.device() if isinstance(device, RegisteredDevice) else device
        if connect_timeout_s is not None and target.ssh is not None:
            target.ssh.connect_timeout_s = connect_timeout_s
        super().__init__(target, reconnect_delays_s=())
        self.command_timeout_s = command_timeout_s

    @property
    def root(self) -> str:
        """The agent's folder on the device, as the agent's --root (relative: under the login's home)."""
        return self.remote_path()

    def connect(self, retry: bool = False) -> SshSession:
        """The live session (one attempt by default); its SFTP channel gets the command timeout at once."""
        fresh = self.session is None or not self.session.active
        session = super().connect(retry)
        if fresh:
            with session.sftp("opening SFTP") as sftp:
                self._timeouts(sftp)
        return session

    def open(self) -> SshSession:
        """Connect (one attempt), install the agent if needed, point `agent.pyz` at it."""
        session = self.connect()
        agent = self.ensure_agent(session)
        link = self.remote_path(STABLE_AGENT_NAME)
        with session.sftp("linking agent.pyz") as sftp:
            try:
                current = sftp.readlink(link)
            except OSError:
                current = None
            if current != posixpath.basename(agent):
                tmp = f"{link}.tmp-{uuid.uuid4().hex[:8]}"
                sftp.symlink(posixpath.basename(agent), tmp)
                sftp.posix_rename(tmp, link)
        return session

    def _timeouts(self, sftp: Any) -> None:
        # a link that goes dead mid-transfer must not hang the rollout's thread forever
        sftp.get_channel().settimeout(self.command_timeout_s)

    def _run(self, args: list[str], timeout: float | None = None) -> dict[str, Any]:
        session = self.connect()
        return self._agent(session, self.ensure_agent(session), [*args, "--root", self.root],
                           timeout or self.command_timeout_s)

    # the agent's commands ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The agent's `status`: current and previous version, kept versions (validated)."""
        result = self._run(["status"])
        return {"current": self._summary(result.get("current")), "previous": self._version(result.get("previous")),
                "versions": [self._summary(v) for v in result.get("versions") or []]}

    def install(self, model: bytes, sha256: str, reference: bytes, reference_sha256: str,
                meta: dict[str, Any], keep: int, health_timeout: float | None = None) -> dict[str, Any]:
        """Upload the model and its reference data, then the agent's `install` (sha256 checked there).

        With `health_timeout`, the agent health-checks the new current in the same command
        (`install --health`) and the result's "health" holds what `health()` returns.
        """
        session = self.connect()
        self.ensure_agent(session)
        incoming = self.remote_path("deploy", "incoming")
        tag = uuid.uuid4().hex[:8]
        model_tmp = posixpath.join(incoming, f"{sha256}.onnx.part-{tag}")
        ref_tmp = posixpath.join(incoming, f"{sha256}.reference.npz.part-{tag}")
        try:
            with session.sftp("uploading the model") as sftp:
                makedirs(sftp, incoming)
                self._upload(sftp, model, model_tmp)
                self._upload(sftp, reference, ref_tmp)
            result = self._run(["install", "--model", model_tmp, "--sha256", sha256, "--reference", ref_tmp,
                                "--reference-sha256", reference_sha256, "--meta", json.dumps(meta),
                                "--keep", str(keep), *(["--health"] if health_timeout else [])],
                               self.command_timeout_s + (health_timeout or 0))
        except MeasurementError:
            if self.session is not None and self.session.active:  # leave nothing behind on a refused install
                with contextlib.suppress(Exception), session.sftp("removing a failed upload") as sftp:
                    for path in (model_tmp, ref_tmp):
                        with contextlib.suppress(OSError):
                            sftp.remove(path)
            raise
        if result.get("version") != sha256:
            raise MeasurementError(f"device {self.name!r}: the agent installed {str(result.get('version'))[:16]!r}, "
                                   f"not {sha256[:16]}")
        out = {"version": sha256, "previous": self._version(result.get("previous")),
               "unchanged": bool(result.get("unchanged")),
               "removed": [self._version(v) for v in result.get("removed") or []]}
        if health_timeout:
            out["health"] = self._health(result.get("health") or {})
        return out

    def health(self, timeout: float | None = None) -> dict[str, Any]:
        """The agent's `health` of current (the agent's JSON; its version validated)."""
        return self._health(self._run(["health"], timeout))

    def _health(self, result: dict[str, Any]) -> dict[str, Any]:
        result = dict(result)
        result["version"] = self._version(result.get("version"))
        result["healthy"] = result.get("healthy") is True
        result["reasons"] = [_text(r, 500) for r in result.get("reasons") or []]
        return {k: v for k, v in result.items() if k not in ("schema_version", "command")}

    def rollback(self, from_version: str | None = None, allow_empty: bool = False) -> dict[str, Any]:
        """The agent's `rollback`: back to the version active before current (only if current is `from_version`)."""
        args = ["rollback"]
        if from_version is not None:
            args += ["--from", self._version(from_version)]
        if allow_empty:
            args.append("--allow-empty")
        result = self._run(args)
        return {"rolled_back": bool(result.get("rolled_back")), "from": self._version(result.get("from")),
                "to": self._version(result.get("to")), "current": self._summary(result.get("current"))}

    # validation of what the device says ------------------------------------------------------------

    def _version(self, value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not SHA256.match(value):
            raise MeasurementError(f"device {self.name!r}: the agent answered {str(value)[:40]!r} where a version "
                                   "(a sha256) belongs; refusing to use it")
        return value

    def _summary(self, value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise MeasurementError(f"device {self.name!r}: the agent's version summary is not an object")
        out: dict[str, Any] = {"version": self._version(value.get("version"))}
        for key in _TEXT_FIELDS:
            out[key] = _text(value.get(key), 120)
        health = value.get("health") if isinstance(value.get("health"), dict) else None
        out["health"] = None if health is None else {
            "healthy": bool(health.get("healthy")), "checked_at": _number(health.get("checked_at")),
            "reasons": [_text(r, 500) for r in health.get("reasons") or []]}
        return out


def _text(value: Any, limit: int) -> str | None:
    if value is None:
        return None
    return "".join(c for c in str(value) if c.isprintable())[:limit]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None
