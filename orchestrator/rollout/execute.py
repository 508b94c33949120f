"""`orchestrate deploy`: roll a run's chosen model out to its profile's devices, canaries first (docs/rollout.md).

The plan: the run's chosen model (results.json `best`, the model cache by sha256), the
profile's registered devices in waves (the canaries, then at most K at a time), and what the
device's health check compares against (reference outputs computed here). Each device: upload,
`install` (sha256 checked on the device, `current` switched atomically), `health`, and
`rollback` if unhealthy. A failed canary stops the rollout and rolls every canary back; a
failure in a later wave rolls that device back and stops (or, with on_failure="continue", goes
on). An offline device is left for `deploy --resume`. Everything is recorded per device in the
registry's SQLite file (orchestrator/rollout/deployments.py).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from orchestrator.devices.registry import DeviceRegistry
from orchestrator.devices.transport import Deployable
from orchestrator.errors import (
    DeployError,
    DeviceUnreachable,
    HostKeyMismatch,
    MeasurementError,
    RolloutFailed,
    RolloutIncomplete,
)
from orchestrator.fleet.transports import deploy_target
from orchestrator.rollout.deployments import HEARTBEAT_S, RESUMABLE, DeploymentStore, live_message, owner_alive
from orchestrator.rollout.healthcheck import read_samples, reference_data
from orchestrator.rollout.plan import ChosenModel, Plan, RolloutOptions, TargetFactory, make_plan

Event = Callable[[str, dict[str, Any]], None]
log = logging.getLogger(__name__)
FAILED = ("failed", "rolled-back")
LEFT = ("pending", "installing", "offline")  # what --resume picks up
UNKNOWN = ("installing", "offline")  # an earlier attempt may have installed on the device, or not


@dataclass
class RolloutResult:
    """How a rollout ended: its status, each device's state, and the devices its transport cannot deploy to."""

    rollout_id: str
    status: str
    message: str
    devices: dict[str, dict[str, Any]]
    not_deployable: dict[str, str] = field(default_factory=dict)  # name -> why (not in the waves)


# ------------------------------------------------------------------------------------------ the rollout


def new_rollout_id(profile: str) -> str:
    """Sortable and unique: time, profile, random suffix."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{profile}-{uuid.uuid4().hex[:6]}"


class Rollout:
    """One rollout's execution: waves in order, up to K devices at once within a wave."""

    def __init__(self, plan: Plan, options: RolloutOptions, rollout_id: str, store: DeploymentStore,
                 registry: DeviceRegistry, on_event: Event, target_factory: TargetFactory = deploy_target) -> None:
        self.plan, self.options, self.rollout_id = plan, options, rollout_id
        self.store, self.registry, self.target_factory = store, registry, target_factory
        lock = threading.Lock()

        def emit(kind: str, data: dict[str, Any]) -> None:
            with lock:  # events come from the wave's threads
                on_event(kind, {"rollout_id": rollout_id, **data})
        self.emit = emit
        self.model = plan.chosen.path.read_bytes()
        if hashlib.sha256(self.model).hexdigest() != plan.chosen.sha256:
            raise DeployError(f"{plan.chosen.path} changed after it was checked; not deployed")
        try:
            self.reference = reference_data(self.model, int(plan.spec["threads"]), read_samples(plan.chosen.samples))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
            raise DeployError(f"cannot compute the reference outputs of {plan.chosen.path} here: {exc}") from None
        self.reference_sha = hashlib.sha256(self.reference).hexdigest()
        self.meta = {"run_id": plan.chosen.run_id, "candidate": plan.chosen.candidate, "label": plan.chosen.label,
                     "rollout_id": rollout_id, "health": plan.spec}
        self.health_timeout = plan.spec["time_budget_s"] * 2 + 30  # warm-up and timed runs, session start

    def _target(self, name: str) -> Deployable:
        return self.target_factory(self.plan.devices[name], self.options.command_timeout_s,
                                   self.options.connect_timeout_s)

    def _state(self, name: str, state: str, **fields: Any) -> str:
        self.store.set_state(self.rollout_id, name, state, **fields)
        self.emit("device", {"name": name, "state": state, **fields})
        return state

    def _record(self, name: str, current: dict[str, Any] | None, health: dict[str, Any] | None = None) -> None:
        device = self.plan.devices[name]
        self.store.record(name, device.registered_at, current, self.rollout_id, health)
        self.registry.set_deployed_model(name, (current or {}).get("version"))

    def deploy_one(self, name: str, before: str = "pending") -> str:
        """Install, health-check, and roll back if unhealthy, one device; returns its final state.

        `before` is the device's state in this rollout so far: `installing` or `offline` (a
        resumed rollout) means an earlier attempt may have installed the model on the device
        after all (a host killed mid-install: the device's own install goes on).
        """
        sha = self.plan.chosen.sha256
        self._state(name, "installing")
        target = self._target(name)
        try:
            try:
                target.open()
            except HostKeyMismatch as exc:
                self.registry.set_status(name, "host-key-changed", str(exc))
                return self._state(name, "failed", error=str(exc))
            except (DeviceUnreachable, MeasurementError) as exc:
                self.registry.set_status(name, "offline", str(exc))
                return self._state(name, "offline", error=str(exc))
            self.registry.set_status(name, "online")
            self.emit("uploading", {"name": name})
            try:
                installed = target.install(self.model, sha, self.reference, self.reference_sha, self.meta,
                                           self.options.keep, health_timeout=self.health_timeout)
                if installed["unchanged"] and before in UNKNOWN:
                    # current already was this version: the earlier attempt's install went through on the
                    # device. What it ran before is the version before this one in the device's own history.
                    installed["previous"] = target.status()["previous"]
                self.store.set_state(self.rollout_id, name, "installing", previous_version=installed["previous"])
                health = installed["health"]
            except MeasurementError as exc:
                return self._after_error(target, name, exc)
            current = {"version": sha, "run_id": self.plan.chosen.run_id, "candidate": self.plan.chosen.candidate,
                       "label": self.plan.chosen.label, "precision": self.plan.chosen.precision}
            if health.get("healthy") and health.get("version") == sha:
                self._record(name, current, health)
                return self._state(name, "healthy", health=health, previous_version=installed["previous"])
            try:
                back = target.rollback(from_version=sha, allow_empty=True)
            except MeasurementError as exc:
                self._record(name, current, health)
                return self._state(name, "failed", health=health,
                                   error=f"health check failed and the rollback failed too: {exc}")
            self._record(name, back["current"], health)
            return self._state(name, "rolled-back", health=health, previous_version=installed["previous"],
                               error="health check failed: " + "; ".join(health.get("reasons") or ["?"]))
        finally:
            target.close()

    def _after_error(self, target: Deployable, name: str, exc: MeasurementError) -> str:
        """An install or health check that failed: offline if the device is gone, else roll back what is unverified."""
        target.close()
        try:
            target.open()
        except HostKeyMismatch as again:
            self.registry.set_status(name, "host-key-changed", str(again))
            return self._state(name, "failed", error=f"{exc}; then {again}")
        except (DeviceUnreachable, MeasurementError) as again:
            self.registry.set_status(name, "offline", str(again))
            return self._state(name, "offline", error=f"{exc}; then unreachable: {again}")
        try:  # the new version may have become current before the error: unverified, so it goes
            back = target.rollback(from_version=self.plan.chosen.sha256, allow_empty=True)
            if back["rolled_back"]:
                self._record(name, back["current"])
        except MeasurementError as rollback_error:
            return self._state(name, "failed", error=f"{exc}; the rollback failed too: {rollback_error}")
        return self._state(name, "failed", error=str(exc))

    def roll_back(self, name: str, why: str) -> str:
        """Roll a healthy device back off this rollout's version (a canary, after another canary failed)."""
        target = self._target(name)
        try:
            back = target.rollback(from_version=self.plan.chosen.sha256, allow_empty=True)
            self._record(name, back["current"])
            return self._state(name, "rolled-back", error=why)
        except (DeviceUnreachable, HostKeyMismatch, MeasurementError) as exc:
            return self._state(name, "failed", error=f"{why}; its rollback failed: {exc}")
        finally:
            target.close()

    def _parallel(self, names: list[str], work: Callable[[str], str]) -> None:
        if not names:
            return
        pool = ThreadPoolExecutor(max_workers=min(len(names), max(1, self.options.max_parallel)))
        try:
            list(pool.map(work, names))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def run(self, states: dict[str, str]) -> RolloutResult:
        """Go through the waves; `states` is every device's state so far (all pending for a new rollout).

        The store hears this process's heartbeat all along (the rollout is live, see deployments.py).
        """
        done = threading.Event()

        def beat() -> None:
            while not done.wait(HEARTBEAT_S):
                try:
                    self.store.heartbeat(self.rollout_id)
                except Exception as exc:  # noqa: BLE001 - a busy store must not end the rollout
                    log.warning("rollout %s: heartbeat not stored: %s", self.rollout_id, exc)

        heart = threading.Thread(target=beat, name=f"heartbeat-{self.rollout_id}", daemon=True)
        heart.start()
        try:
            return self._run(states)
        finally:
            done.set()
            heart.join(timeout=HEARTBEAT_S)

    def _run(self, states: dict[str, str]) -> RolloutResult:
        status, message = None, ""
        for index, wave in enumerate(self.plan.waves):
            canary = index == 0 and self.plan.canaries > 0
            todo = [n for n in wave if states[n] in LEFT]
            if todo:
                self.emit("wave", {"index": index + 1, "devices": todo, "canary": canary})

                def work(name: str) -> str:
                    try:
                        states[name] = self.deploy_one(name, states[name])
                    except Exception as exc:  # noqa: BLE001 - a bug must not leave the other devices unreported
                        log.exception("device %s", name)
                        states[name] = self._state(name, "failed", error=f"internal error: {type(exc).__name__}: {exc}")
                    return states[name]
                self._parallel(todo, work)
            failed = [n for n in wave if states[n] in FAILED]
            if canary and failed:
                for name in [n for n in wave if states[n] == "healthy"]:
                    states[name] = self.roll_back(name, f"canary {', '.join(failed)} failed")
                status = "stopped"
                message = (f"canary {', '.join(failed)} failed ({self._errors(failed)}); every canary was rolled "
                           "back and no other device was touched")
                break
            if canary and not any(states[n] == "healthy" for n in wave):
                status = "incomplete"
                message = f"no canary could be reached ({self._errors(wave)}); nothing else was touched"
                break
            if failed and self.options.on_failure == "stop":
                status = "stopped"
                message = (f"wave {index + 1}: {', '.join(failed)} failed ({self._errors(failed)}) and stayed on or "
                           "went back to the previous version; later waves were not started")
                break
        later = [n for wave in self.plan.waves for n in wave if states[n] == "pending"]
        if status == "stopped":
            for name in later:
                states[name] = self._state(name, "skipped", error="the rollout stopped before this device")
        elif status is None:
            left = [n for n in states if states[n] in LEFT]
            failed = [n for n in states if states[n] in FAILED]
            if left:
                status = "incomplete"
                message = f"{', '.join(left)} offline ({self._errors(left)})"
            elif failed:
                status, message = "done-with-failures", f"{', '.join(failed)} failed ({self._errors(failed)})"
            else:
                status, message = "done", f"{len(states)} device(s) healthy"
        if self.plan.not_deployable:
            message += "; not deployed to (its transport cannot be): " + "; ".join(
                f"{n}: {why}" for n, why in self.plan.not_deployable.items())
        self.store.finish_rollout(self.rollout_id, status, message)
        record = self.store.get_rollout(self.rollout_id)
        return RolloutResult(self.rollout_id, status, message, record["devices"], dict(self.plan.not_deployable))

    def _errors(self, names: list[str]) -> str:
        """The first device's reason (each device's own line was printed as it happened)."""
        device = self.store.get_rollout(self.rollout_id)["devices"][names[0]]
        more = f"; and {len(names) - 1} more" if len(names) > 1 else ""
        return f"{names[0]}: {device['error'] or device['state']}{more}"


def deploy(chosen: ChosenModel, options: RolloutOptions, on_event: Event = lambda kind, data: None,
           target_factory: TargetFactory = deploy_target, resume: dict[str, Any] | None = None,
           force: bool = False) -> RolloutResult:
    """Roll one chosen model out (or go on with a stored rollout, `resume`); raises when it did not end `done`.

    RolloutFailed (exit 1) when a device failed (a canary, or a later one with on_failure=stop);
    RolloutIncomplete (exit 4) when devices were left offline for `--resume`. DeployError when
    the rollout may not run: another one of the profile is live; or, resuming, this one is live,
    or (without `force`) it would put its model over a newer deployment.
    """
    registry, store = DeviceRegistry(), DeploymentStore()
    if resume is None:
        plan = make_plan(chosen, options, registry)
        rollout_id = new_rollout_id(chosen.profile)
        superseded = store.create_rollout(rollout_id, chosen.run_id, chosen.profile, chosen.sha256,
                                          {"candidate": chosen.candidate, "label": chosen.label,
                                           "precision": chosen.precision},
                                          {**asdict(options), "canaries": plan.canaries}, plan.waves)
        for old in superseded:
            on_event("superseded", {"rollout_id": old, "by": rollout_id})
        states = {n: "pending" for wave in plan.waves for n in wave}
    else:
        rollout_id = resume["id"]
        options = RolloutOptions(**{**asdict(options), **{k: v for k, v in resume["options"].items()
                                                          if k in ("canary", "max_parallel", "on_failure", "keep")}})
        plan = make_plan(chosen, options, registry)
        missing = [n for n in resume["devices"] if n not in plan.devices]
        if missing:
            raise DeployError(f"rollout {rollout_id}: {', '.join(missing)} no longer registered in profile "
                              f"{chosen.profile!r}; start a new rollout")
        plan.waves = resume["waves"]
        plan.canaries = int(resume["options"].get("canaries", 0))
        states = {n: d["state"] for n, d in resume["devices"].items()}
        if not force:
            newer = overtaken(resume, store, registry)
            if newer:
                raise DeployError(f"rollout {rollout_id} would go backwards: {'; '.join(newer)}; "
                                  "deploy --resume --force puts its model back anyway")
        store.claim(rollout_id)
    rollout = Rollout(plan, options, rollout_id, store, registry, on_event, target_factory)
    on_event("rollout", {"rollout_id": rollout_id, "plan": plan, "resumed": resume is not None, "options": options})
    try:
        result = rollout.run(states)
    except KeyboardInterrupt:
        store.finish_rollout(rollout_id, "interrupted", "interrupted (Ctrl-C); orchestrate deploy --resume goes on")
        raise
    on_event("finished", asdict(result))
    if result.status in ("stopped", "done-with-failures"):
        raise RolloutFailed(f"rollout {rollout_id} {result.status}: {result.message}")
    if result.status == "incomplete":
        raise RolloutIncomplete(f"rollout {rollout_id} incomplete: {result.message}; "
                                f"when they are back: orchestrate deploy --resume {rollout_id}")
    return result


def overtaken(rollout: dict[str, Any], store: DeploymentStore, registry: DeviceRegistry) -> list[str]:
    """The devices a resumed rollout would still install on whose deployment changed after it began
    (another rollout, a rollback) to another version: resuming would put an older decision back."""
    registered = {d.name: d.registered_at for d in registry.list()}
    deployed = store.deployments(registered)
    out = []
    for name, device in rollout["devices"].items():
        d = deployed.get(name)
        if device["state"] not in LEFT or d is None or d["rollout_id"] == rollout["id"]:
            continue
        if (d["deployed_at"] or 0) > rollout["created_at"] and d["version"] != rollout["model_sha256"]:
            by = f"rollout {d['rollout_id']}" if d["rollout_id"] else "a later change"
            now = (d["version"] or "nothing")[:12]
            out.append(f"{name} runs {now} since {by}, newer than this rollout's {rollout['model_sha256'][:12]}")
    return out


def find_resumable(ident: str | None = None, profile: str | None = None, force: bool = False) -> dict[str, Any]:
    """The rollout `deploy --resume [ID]` goes on with: ID is a rollout id (prefix) or a run id; else the newest.

    A superseded rollout is resumed only by its id and with `force`; a live one is refused (DeployError).
    """
    store = DeploymentStore()
    rollout = None
    if ident:
        try:
            rollout = store.get_rollout(ident)
        except DeployError:
            rollout = store.latest_resumable(run_id=ident, profile=profile)
    else:
        rollout = store.latest_resumable(profile=profile)
    if rollout is None:
        latest = store.latest()
        hint = f" (the newest, {latest['id']}, is {latest['status']})" if latest else ""
        raise DeployError(f"no rollout to resume{' for ' + repr(ident) if ident else ''}{hint}")
    if rollout["status"] == "superseded":
        if not force:
            raise DeployError(f"rollout {rollout['id']} was superseded by rollout {rollout['superseded_by']}: "
                              "resuming it would put its older model back; deploy --resume "
                              f"{rollout['id']} --force does it anyway")
    elif rollout["status"] not in RESUMABLE:
        why = {"stopped": "it stopped because a device failed; deploy again once that is fixed",
               "done": "every device is done"}.get(rollout["status"], "")
        raise DeployError(f"rollout {rollout['id']} is {rollout['status']}: nothing to resume"
                          f"{'; ' + why if why else ''}")
    if owner_alive(rollout):
        raise DeployError(f"{live_message(rollout)}; not resumed (one process drives a rollout at a time)")
    return rollout


def rollback_devices(names: list[str], max_parallel: int = 4, on_event: Event = lambda kind, data: None,
                     target_factory: TargetFactory = deploy_target) -> dict[str, dict[str, Any]]:
    """`orchestrate rollback`: each device back to the version active before its current one.

    Returns {name: {"from", "to"} or {"error"}}; raises RolloutFailed naming every device that
    could not be rolled back (offline, nothing to go back to).
    """
    registry, store = DeviceRegistry(), DeploymentStore()
    devices = [registry.get(n) for n in names]
    # the per-profile lock a rollout holds: refused while a rollout of a profile is live; held (kept alive by a
    # heartbeat) until the rollback ends, so that no rollout of the profile starts or resumes under it
    rollback_id = store.begin_rollback({d.profile for d in devices})
    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_S):
            try:
                store.rollback_heartbeat(rollback_id)
            except Exception as exc:  # noqa: BLE001 - a missed beat must not end the rollback
                log.warning("rollback %s: heartbeat not stored: %s", rollback_id, exc)

    heart = threading.Thread(target=beat, name=f"heartbeat-{rollback_id}", daemon=True)
    heart.start()
    try:
        return _rollback_devices(registry, store, devices, names, max_parallel, on_event, target_factory)
    finally:
        done.set()
        heart.join(timeout=HEARTBEAT_S)
        store.finish_rollback(rollback_id)


def _rollback_devices(registry, store, devices, names, max_parallel, on_event, target_factory):
    """rollback_devices' work, under the profiles' lock."""
    lock = threading.Lock()

    def one(device) -> dict[str, Any]:
        try:
            target = target_factory(device)
        except DeployError as exc:  # its transport cannot deploy: nothing to roll back there
            outcome: dict[str, Any] = {"error": str(exc)}
            with lock:
                on_event("rolled_back", {"name": device.name, **outcome})
            return outcome
        try:
            back = target.rollback()
        except HostKeyMismatch as exc:
            registry.set_status(device.name, "host-key-changed", str(exc))
            outcome = {"error": str(exc)}
        except (DeviceUnreachable, MeasurementError) as exc:
            outcome = {"error": str(exc)}
        else:
            current = back["current"]
            health = dict(current["health"], version=current["version"]) if current and current["health"] else None
            store.record(device.name, device.registered_at, current, health=health)
            registry.set_deployed_model(device.name, back["to"])
            outcome = {"from": back["from"], "to": back["to"], "current": current}
        finally:
            target.close()
        with lock:
            on_event("rolled_back", {"name": device.name, **outcome})
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(devices)))) as pool:
        results = dict(zip(names, pool.map(one, devices)))
    failed = {n: r["error"] for n, r in results.items() if "error" in r}
    if failed:
        raise RolloutFailed(f"{len(failed)} of {len(names)} device(s) not rolled back: "
                            + "; ".join(f"{n}: {e}" for n, e in failed.items()))
    return results
