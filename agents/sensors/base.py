"""What every energy sensor shares: file access under the sysfs root, the sensor base classes, and
the background sampling of instantaneous power (integrated by trapezoids).

DEPENDENCY NOTE: the ``agents.sensors`` modules run on the edge device (see agents/kernel.py):
standard library only (numpy is allowed but not needed), Python 3.9 syntax, and no subprocesses
except the guarded ``vcgencmd pmic_read_adc`` call on a Raspberry Pi 5 (agents/sensors/rpi_pmic.py).

Two kinds of sensor:

- counters (``RaplSensor``, ``NvmlSensor``) keep a cumulative energy count; it is read at start and stop;
- sampled sensors (``Ina3221Sensor``, ``PmicSensor``) give instantaneous power; a background thread
  reads it at a fixed interval and the energy is the trapezoid integral over the real sample times.

Every file is read under ``$EDGE_AGENT_SYSFS_ROOT`` (default ``/``), so a test points the agent at a
recorded tree, and the QEMU-emulated device at an empty one. That tree also decides whether the
non-file sensors exist: NVML needs its ``/proc/driver/nvidia/version`` and the PMIC needs a
Raspberry Pi device-tree model under the root.
"""

from __future__ import annotations

import os
import re
import threading
import time

SYSFS_ROOT_ENV = "EDGE_AGENT_SYSFS_ROOT"
IDLE_SECONDS = 0.5
# Fewer power samples than this over the timed runs make a coarse integral: the agent says so.
MIN_POWER_SAMPLES = 5


# ------------------------------------------------------------------------------------- file access


def read_text_file(path: str) -> str | None:
    """Return the stripped contents of a text file, or None if it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except (OSError, ValueError):
        return None


def read_int_file(path: str) -> int | None:
    """Return the integer stored in a (sysfs) file, or None if unreadable or not an integer."""
    text = read_text_file(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def sys_path(relative: str) -> str:
    """Map an absolute sysfs path under the root given by $EDGE_AGENT_SYSFS_ROOT (default "/")."""
    return os.path.join(os.environ.get(SYSFS_ROOT_ENV) or "/", relative.lstrip("/"))


def number_suffix(path: str) -> int:
    """The last number in a file name (``intel-rapl:1`` -> 1, ``rail_name_2`` -> 2), or -1."""
    digits = re.findall(r"\d+", os.path.basename(path))
    return int(digits[-1]) if digits else -1


# ------------------------------------------------------------------------------------- base classes


class SensorError(Exception):
    """A sensor that was readable failed during a measurement."""


class EnergySensor:
    """A measured energy source: start(), then stop() -> (joules, seconds) over that window."""

    name = "sensor"  # as listed by `info`
    source = "measured"  # the result's `source`
    description = "energy sensor"  # the start of the result's `method`
    rail = None  # what is measured, e.g. "VDD_IN" or "package-0"
    idle_seconds = IDLE_SECONDS
    samples = 0  # readings behind the last stop()

    @classmethod
    def discover(cls) -> EnergySensor | None:
        """This sensor if the device has it and it can be read now, else None."""
        raise NotImplementedError

    @classmethod
    def readable(cls) -> bool:
        """Whether `info` lists this sensor."""
        return cls.discover() is not None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> tuple[float, float]:
        raise NotImplementedError

    def abort(self) -> None:
        """Drop a started measurement (the timed runs failed)."""

    def idle_watts(self, seconds: float | None = None) -> float:
        """Average power over `seconds` (default: this sensor's idle_seconds) of doing nothing."""
        self.start()
        time.sleep(self.idle_seconds if seconds is None else seconds)
        joules, elapsed = self.stop()
        return joules / elapsed if elapsed > 0 else 0.0


class SampledSensor(EnergySensor):
    """Instantaneous power read by a background thread every `interval_s`, integrated by trapezoids.

    start() and stop() each take one reading themselves, so the samples span the whole window.
    A reading that fails in between (an I2C hiccup) is skipped: the trapezoid spans the gap.
    """

    interval_s = 0.02

    def read_watts(self) -> float:
        """Power now, in watts; SensorError if it cannot be read."""
        raise NotImplementedError

    def _sample(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        watts = self.read_watts()
        return (t0 + time.perf_counter()) / 2, watts  # a slow read (vcgencmd) is stamped at its middle

    def _sample_loop(self) -> None:
        next_at = time.perf_counter() + self.interval_s
        while not self._stopping.wait(max(next_at - time.perf_counter(), 0.0)):
            try:
                self._samples.append(self._sample())
            except SensorError:
                self._missed += 1
            next_at += self.interval_s
            now = time.perf_counter()
            if next_at < now:  # a read overran: wait a whole interval rather than read back to back
                next_at = now + self.interval_s

    def start(self) -> None:
        self._samples = [self._sample()]
        self._missed = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, name="energy-sampler", daemon=True)
        self._thread.start()

    def _join(self) -> None:
        self._stopping.set()
        self._thread.join()

    def abort(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self._join()

    def stop(self) -> tuple[float, float]:
        self._join()
        self._samples.append(self._sample())
        samples = self._samples
        if self._missed > len(samples):
            raise SensorError("%s: %d of %d power readings failed" % (self.name, self._missed,
                                                                       self._missed + len(samples)))
        self.samples = len(samples)
        return integrate_power(samples), samples[-1][0] - samples[0][0]


def integrate_power(samples: list[tuple[float, float]]) -> float:
    """Joules from (seconds, watts) samples in time order: the trapezoid rule over their real times."""
    # zip, not itertools.pairwise: that is Python 3.10+, and the agent runs on 3.9
    return sum((t1 - t0) * (w0 + w1) / 2.0 for (t0, w0), (t1, w1) in zip(samples, samples[1:]))  # noqa: RUF007
