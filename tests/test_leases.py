"""Device leases with real Ray actors and the real agent: one measurement per device at a time (checked
from the agent's own timestamps), devices in parallel, replicas combined by median, the measurement cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.config.profile import Profile
from orchestrator.devices.base import Device
from orchestrator.fleet.lease import DeviceLease, LeasePool, combine_measurements
from orchestrator.fleet.measurements import MeasurementCache

PROFILE = Profile.model_validate({
    "name": "lease-test", "hardware": {"arch": "x86_64", "cpu": "test", "cores": 2, "memory_mb": 1024},
    "objective": {"metric": "latency_p50"},
    "measurement": {"warmup_runs": 3, "runs": 100000, "time_budget_s": 1.5},
    "power": {"idle_watts": 1.0, "active_watts": 2.0, "source": "test profile, not a real board"},
})


@pytest.fixture
def model_bytes(eo_tiny_onnx) -> bytes:
    return eo_tiny_onnx().SerializeToString()


def _leases(ray, names_cpus, **kwargs):
    return [ray.remote(DeviceLease).options(num_cpus=0).remote(
        Device(name=name, transport="local", arch="x86_64", pinned_cpu=cpu), PROFILE, None, *kwargs.get("cache", ()))
        for name, cpu in names_cpus]


def _overlaps(windows):
    """Pairs of (start, end) windows that overlap."""
    windows = sorted(windows)
    return [(a, b) for a, b in zip(windows, windows[1:]) if b[0] < a[1]]


def test_one_device_never_measures_two_models_at_once(ray_local, model_bytes):
    ray = ray_local
    pool = ray.remote(LeasePool).options(num_cpus=0).remote(_leases(ray, [("dev-a", 0)]))
    results = ray.get([pool.measure.remote(model_bytes) for _ in range(4)])
    assert all("error" not in r for r in results), results
    windows = [(r["started_at"], r["finished_at"]) for r in results]
    assert all(end > start for start, end in windows)
    assert _overlaps(windows) == [], "two measurements ran on one device at once"
    # the agent runs at the driver's priority, not Ray's worker niceness (15 by default)
    assert {r["niceness"] for r in results} == {os.nice(0)}


def test_two_devices_measure_in_parallel_each_one_at_a_time(ray_local, model_bytes):
    ray = ray_local
    pool = ray.remote(LeasePool).options(num_cpus=0).remote(_leases(ray, [("dev-a", 0), ("dev-b", 1)]))
    results = ray.get([pool.measure.remote(model_bytes) for _ in range(6)])
    assert all("error" not in r for r in results), results
    by_device: dict[str, list] = {}
    for r in results:
        by_device.setdefault(r["device"], []).append((r["started_at"], r["finished_at"]))
    assert set(by_device) == {"dev-a", "dev-b"}
    for device, windows in by_device.items():
        assert _overlaps(windows) == [], f"{device} measured two models at once"
    everything = [w for ws in by_device.values() for w in ws]
    assert _overlaps(everything), "the two devices never measured at the same time"


def test_replicas_measure_on_distinct_devices_and_take_medians(ray_local, model_bytes):
    ray = ray_local
    pool = ray.remote(LeasePool).options(num_cpus=0).remote(_leases(ray, [("dev-a", 0), ("dev-b", 1)]), 2)
    result = ray.get(pool.measure.remote(model_bytes))
    assert "error" not in result, result
    per_device = result["per_device"]
    assert sorted(d["device"] for d in per_device) == ["dev-a", "dev-b"]
    p50s = sorted(d["p50_ms"] for d in per_device)
    assert result["latency_ms"]["p50"] == pytest.approx(sum(p50s) / 2)  # the median of two
    windows = [(d["started_at"], d["finished_at"]) for d in per_device]
    assert _overlaps(windows), "the replicas were not measured at the same time"


def _answer(device: str, p50: float) -> dict:
    return {"device": device, "latency_ms": {"p50": p50, "p90": p50 * 1.1, "mean": p50, "std": 0.01, "cv": 0.01,
                                             "p99": p50 * 1.2},
            "peak_memory_mb": 50.0, "model_memory_mb": 5.0, "noisy": False,
            "energy": {"energy_mj": p50 * 2, "source": "estimated", "method": "power model"}}


def test_combine_flags_the_device_that_disagrees():
    combined = combine_measurements([_answer("a", 1.0), _answer("b", 1.05), _answer("c", 2.0)])
    assert combined["latency_ms"]["p50"] == 1.05
    assert combined["energy"]["energy_mj"] == pytest.approx(2.1)
    assert len(combined["flags"]) == 1 and combined["flags"][0].startswith("device c:")
    agree = combine_measurements([_answer("a", 1.0), _answer("b", 1.1), _answer("c", 0.95)])
    assert agree["flags"] == []
    failed = combine_measurements([_answer("a", 1.0), {"device": "b", "error": "agent timed out"}])
    assert failed["latency_ms"]["p50"] == 1.0 and {"device": "b", "error": "agent timed out"} in failed["per_device"]


def test_measurement_cache_answers_the_same_model_on_the_same_device(ray_local, model_bytes, tmp_path):
    ray = ray_local
    path = str(tmp_path / "measurements.sqlite")
    lease = ray.remote(DeviceLease).options(num_cpus=0).remote(
        Device(name="dev-a", transport="local", arch="x86_64", pinned_cpu=0), PROFILE, None, path)
    first = ray.get(lease.measure.remote(model_bytes))
    second = ray.get(lease.measure.remote(model_bytes))
    assert first["cached"] is False and second["cached"] is True
    assert second["latency_ms"] == first["latency_ms"] and second["started_at"] == first["started_at"]
    assert MeasurementCache(Path(path)).count() == 1
    fresh = ray.remote(DeviceLease).options(num_cpus=0).remote(
        Device(name="dev-a", transport="local", arch="x86_64", pinned_cpu=0), PROFILE, None, path, True)
    again = ray.get(fresh.measure.remote(model_bytes))
    assert again["cached"] is False and again["started_at"] > first["finished_at"]
    other = ray.remote(DeviceLease).options(num_cpus=0).remote(
        Device(name="dev-b", transport="local", arch="x86_64", pinned_cpu=1), PROFILE, None, path)
    assert ray.get(other.measure.remote(model_bytes))["cached"] is False  # another device: its own measurement
