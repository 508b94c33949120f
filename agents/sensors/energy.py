"""The `energy` of a bench result: measured by a sensor, estimated from a power model, or unavailable."""

from __future__ import annotations

from agents.sensors.base import EnergySensor


def measured_energy(sensor: EnergySensor, joules: float, seconds: float, idle_w: float, runs: int) -> dict:
    """Per-inference energy from a measured window: (energy - idle power x time) / runs."""
    dynamic_j = max(joules - idle_w * seconds, 0.0)
    return {
        "energy_mj": dynamic_j / runs * 1000.0,
        "source": sensor.source,
        "method": "%s over %d timed runs minus idle power measured for %.1f s before them, per inference"
        % (sensor.description, runs, sensor.idle_seconds),
        "idle_watts": idle_w,
        "power_watts": joules / seconds if seconds > 0 else None,
        "samples": sensor.samples,
        "rail": sensor.rail,
    }


def estimated_energy(idle_w: float, active_w: float, power_cores: int, threads: int, mean_ms: float) -> dict:
    """Per-inference energy from a power model: (active - idle) x min(threads, cores)/cores x latency."""
    busy = min(threads, power_cores)
    dynamic_w = (active_w - idle_w) * busy / power_cores
    return {
        "energy_mj": dynamic_w * mean_ms,  # W x ms = mJ
        "source": "estimated",
        "method": "power model: (active %.3g W - idle %.3g W) x %d/%d busy cores x mean latency"
        % (active_w, idle_w, busy, power_cores),
        "idle_watts": idle_w,
        "power_watts": idle_w + dynamic_w,
        "samples": None,
        "rail": None,
    }


def unavailable_energy() -> dict:
    """The energy result when there is neither a sensor nor a power model."""
    return {
        "energy_mj": None, "source": "unavailable",
        "method": "no readable energy sensor and no power model (--power-idle-w/--power-active-w)",
        "idle_watts": None, "power_watts": None, "samples": None, "rail": None,
    }
