"""Leases: one `DeviceLease` Ray actor owns each device, so a device runs one benchmark at a time;
a `LeasePool` hands each measurement to whichever lease is free and combines replicas.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.devices.base import OFFLINE_RETRY_S, Device, settings_key
from orchestrator.devices.registry import DeviceRegistry
from orchestrator.errors import DeviceOffline, HostKeyMismatch, MeasurementError
from orchestrator.fleet.measurements import MeasurementCache, device_key
from orchestrator.fleet.transports import make_transport

if TYPE_CHECKING:  # pydantic stays out of `orchestrate --help`
    from orchestrator.config.profile import Profile


class DeviceLease:
    """Owns one device: measurements on it run one at a time. Used as a Ray actor (one per device).

    A registered device's status and last-seen time in the registry follow what its
    measurements find (online, offline, host key changed).
    """

    def __init__(self, device: Device, profile: Profile, registry_path: str | None = None,
                 cache_path: str | None = None, fresh: bool = False) -> None:
        self.device = device
        self.profile = profile
        self.registry_path = registry_path
        self._registry: Any = None
        self.transport = make_transport(device)
        self.cache: Any = None
        if cache_path is not None:

            self.cache = MeasurementCache(Path(cache_path), read=not fresh)
        self._device_key: str | None = None

    def _cache_keys(self, model_sha: str) -> tuple[str, str, str]:
        """(model, device, settings) keys of a measurement; the device's identity comes from its agent's `info`."""
        if self._device_key is None:
            self._device_key = device_key(self.device.name, self.transport.info())
        return model_sha, self._device_key, settings_key(self.device, self.profile)

    def measure(self, model_bytes: bytes) -> dict[str, Any]:
        """Benchmark a model on the leased device.

        Returns the agent's JSON plus `device` (this device's name). A failure comes back as
        `{"error": reason, "device": name}`, with `"offline": True` when the device could not
        be reached at all (so the measurement may go to another device).
        """
        name = self.device.name
        keys = None
        try:
            if self.cache is not None:
                keys = self._cache_keys(hashlib.sha256(model_bytes).hexdigest())
                hit = self.cache.get(*keys)
                if hit is not None and self.device.emulated:
                    from orchestrator.emulation.rule import is_current

                    # counted then, scaled now (or another cost model since a calibration): measure again
                    hit = hit if is_current(hit, self.profile) else None
                if hit is not None:
                    return {**hit, "device": name, "cached": True}
            result = self.transport.bench(model_bytes, self.profile)
        except (DeviceOffline, HostKeyMismatch) as exc:
            self._record("host-key-changed" if isinstance(exc, HostKeyMismatch) else "offline", str(exc))
            return {"error": str(exc), "offline": True, "device": name}
        except MeasurementError as exc:
            if getattr(self.transport, "offline", False):  # the connection dropped and did not come back
                self._record("offline", str(exc))
            return {"error": str(exc), "device": name}
        self._record("online")
        if keys is not None:
            self.cache.put(*keys, name, result)
        return {**result, "device": name, "cached": False}

    def compare(self, models: list[bytes]) -> dict[str, Any]:
        """The final round on the leased device: the models measured together, afresh (never from the cache).

        Returns the agent's `compare` JSON plus `device`, or `{"error": reason, "device": name}`.
        """
        name = self.device.name
        try:
            result = self.transport.compare(models, self.profile)
        except (DeviceOffline, HostKeyMismatch, MeasurementError) as exc:
            return {"error": str(exc), "device": name}
        return {**result, "device": name}

    def _record(self, status: str, reason: str | None = None) -> None:
        if self.registry_path is None:
            return
        if self._registry is None:

            self._registry = DeviceRegistry(self.registry_path)
        self._registry.set_status(self.device.name, status, reason)

    def describe(self) -> dict[str, Any]:
        """The device's description for results."""
        return self.device.describe()


DISAGREE_RATIO = 0.25  # a device whose p50 is this far off the median of the others is flagged


def combine_measurements(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One measurement from several devices' answers to the same model.

    Latency statistics, memory and energy are the medians over the devices that answered;
    `per_device` keeps each device's own figures; `flags` names a device whose p50 is more
    than DISAGREE_RATIO off the median of all (with two devices, both are named when they
    differ: two cannot say which one is right). Failures are kept in `per_device`; only when
    every device failed is the answer a failure (the first one's).
    """
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    per_device = [
        {"device": r.get("device"), "p50_ms": r["latency_ms"]["p50"], "cached": r.get("cached", False),
         "started_at": r.get("started_at"), "finished_at": r.get("finished_at"), "noisy": r.get("noisy"),
         "niceness": r.get("niceness")}
        for r in ok
    ] + [{"device": r.get("device"), "error": r["error"]} for r in results if "error" in r]
    if len(ok) == 1:
        return {**ok[0], "per_device": per_device, "flags": []}
    med = statistics.median
    combined = dict(ok[0])
    combined["latency_ms"] = {k: med(r["latency_ms"][k] for r in ok) for k in ok[0]["latency_ms"]}
    for key in ("peak_memory_mb", "model_memory_mb"):
        values = [r[key] for r in ok if r.get(key) is not None]
        combined[key] = med(values) if values else None
    energies = [r["energy"]["energy_mj"] for r in ok if (r.get("energy") or {}).get("energy_mj") is not None]
    if energies:
        combined["energy"] = {**ok[0]["energy"], "energy_mj": med(energies),
                              "method": f"median over {len(energies)} devices of: {ok[0]['energy'].get('method')}"}
    combined["noisy"] = any(r.get("noisy") for r in ok)
    combined["cached"] = all(r.get("cached") for r in ok)
    combined["device"] = ", ".join(str(r.get("device")) for r in ok)
    flags = []
    middle = combined["latency_ms"]["p50"]
    for r in ok:
        off = abs(r["latency_ms"]["p50"] - middle) / middle if middle else 0.0
        if off > DISAGREE_RATIO:
            flags.append(f"device {r.get('device')}: p50 {r['latency_ms']['p50']:.3g} ms is {off:.0%} off the "
                         f"median of the {len(ok)} devices ({middle:.3g} ms)")
    combined["per_device"], combined["flags"] = per_device, flags
    return combined


class LeasePool:
    """Hands each measurement to free `DeviceLease`s: one measurement per device at a time, all devices busy at once.

    Used as an async Ray actor (asyncio actor) in front of the lease actors; trials call
    `measure` and wait. With `replicas` > 1 a model is measured on that many distinct devices
    at once and the answers are combined (`combine_measurements`). A device found offline
    rests for `OFFLINE_RETRY_S` while the others take the measurements; when every device
    rests, a measurement fails at once.
    """

    def __init__(self, leases: list[Any], replicas: int = 1) -> None:
        self.leases = list(leases)
        self.replicas = max(1, min(replicas, len(self.leases)))
        self.free: asyncio.Queue | None = None  # made on the actor's event loop, at the first call
        self.resting: dict[int, tuple[float, dict[str, Any]]] = {}  # lease index -> (when, offline answer)

    async def measure(self, model_bytes: bytes) -> dict[str, Any]:
        """Measure on `replicas` free devices that are not resting; see `DeviceLease.measure` for what comes back."""
        if self.free is None:
            self.free = asyncio.Queue()
            for index, lease in enumerate(self.leases):
                self.free.put_nowait((index, lease))
        used: set[int] = set()
        results = await asyncio.gather(*(self._measure_one(model_bytes, used) for _ in range(self.replicas)))
        results = [r for r in results if r is not None]
        return combine_measurements(results) if self.replicas > 1 else results[0]

    async def _measure_one(self, model_bytes: bytes, used: set[int]) -> dict[str, Any] | None:
        """One measurement on a free device not in `used` (the other replicas' devices); None if none is left."""
        assert self.free is not None
        while True:
            now = time.monotonic()
            resting = {i: answer for i, (since, answer) in self.resting.items() if now - since < OFFLINE_RETRY_S}
            if len(resting) == len(self.leases):
                return next(iter(resting.values()))
            if len(set(resting) | used) == len(self.leases):
                return None  # every other device rests or already measures this model
            index, lease = await self.free.get()
            if index in resting or index in used:  # wait for another device rather than ask this one again
                self.free.put_nowait((index, lease))
                await asyncio.sleep(0.05)
                continue
            used.add(index)
            try:
                result = await lease.measure.remote(model_bytes)
            finally:
                self.free.put_nowait((index, lease))
            if result.get("offline"):
                self.resting[index] = (time.monotonic(), result)
                used.discard(index)
                continue
            self.resting.pop(index, None)
            return result
