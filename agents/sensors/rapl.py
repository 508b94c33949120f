"""Intel/AMD RAPL package energy counters (Linux powercap)."""

from __future__ import annotations

import glob
import os
import re
import time

from agents.sensors.base import EnergySensor, SensorError, number_suffix, read_int_file, read_text_file, sys_path


class RaplSensor(EnergySensor):
    """Intel/AMD RAPL package energy counters (powercap energy_uj, each wraps at its max_energy_range_uj).

    Only the top-level package zones count (``intel-rapl:N`` named ``package-N``): their subzones
    (core, uncore, dram) and ``intel-rapl-mmio`` are inside a package already, and ``psys`` (the whole
    platform, where present) contains the packages, so adding any of them would count energy twice.
    """

    name = "rapl"
    source = "measured:rapl"
    ZONES = "/sys/class/powercap/intel-rapl:*"

    def __init__(self, zone_dirs: str | list[str]):
        self.zone_dirs = [zone_dirs] if isinstance(zone_dirs, str) else list(zone_dirs)
        names = [read_text_file(os.path.join(d, "name")) or os.path.basename(d) for d in self.zone_dirs]
        self.rail = " + ".join(names)
        self.description = "RAPL package energy counter" + ("s (%s)" % self.rail if len(names) > 1 else "")
        self._start = None

    @classmethod
    def discover(cls) -> RaplSensor | None:
        """The package zones under the sysfs root whose counters are readable, or None."""
        zones = [d for d in glob.glob(sys_path(cls.ZONES))
                 if re.fullmatch(r"intel-rapl:\d+", os.path.basename(d))
                 and read_int_file(os.path.join(d, "energy_uj")) is not None
                 and (read_text_file(os.path.join(d, "name")) or "package").startswith("package")]
        return cls(sorted(zones, key=number_suffix)) if zones else None

    def read_uj(self, zone: int = 0) -> int:
        """The counter of one zone, in microjoules."""
        path = os.path.join(self.zone_dirs[zone], "energy_uj")
        value = read_int_file(path)
        if value is None:
            raise SensorError("cannot read " + path)
        return value

    def delta_uj(self, before: int, after: int, zone: int = 0) -> int:
        """Energy between two readings of one zone's counter, allowing for one wrap-around."""
        if after >= before:
            return after - before
        range_path = os.path.join(self.zone_dirs[zone], "max_energy_range_uj")
        max_range = read_int_file(range_path)
        if not max_range:
            raise SensorError("RAPL counter wrapped and %s is unreadable" % range_path)
        return after + max_range - before

    def _read_all(self) -> list[int]:
        return [self.read_uj(i) for i in range(len(self.zone_dirs))]

    def start(self) -> None:
        self._start = (self._read_all(), time.perf_counter_ns())

    def stop(self) -> tuple[float, float]:
        after, t1 = self._read_all(), time.perf_counter_ns()
        before, t0 = self._start
        self.samples = 2
        uj = sum(self.delta_uj(b, a, i) for i, (b, a) in enumerate(zip(before, after)))
        return uj / 1e6, (t1 - t0) / 1e9
