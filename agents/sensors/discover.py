"""Which energy sensors this device has (`info`), and the one that measures a benchmark."""

from __future__ import annotations

from agents.sensors.base import EnergySensor
from agents.sensors.ina3221 import Ina3221Sensor
from agents.sensors.nvml import NvmlSensor
from agents.sensors.rapl import RaplSensor
from agents.sensors.rpi_pmic import PmicSensor


class CombinedSensor(EnergySensor):
    """Counters of separate parts (CPU packages and GPUs) read together: their energies add."""

    def __init__(self, parts: list[EnergySensor]):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.source = "measured:" + self.name
        self.description = " + ".join(p.description for p in parts)
        self.rail = " + ".join(p.rail or p.name for p in parts)
        self.idle_seconds = max(p.idle_seconds for p in parts)

    def start(self) -> None:
        for part in self.parts:
            part.start()

    def stop(self) -> tuple[float, float]:
        readings = [part.stop() for part in self.parts]
        self.samples = sum(part.samples for part in self.parts)
        return sum(j for j, _ in readings), max(s for _, s in readings)

    def abort(self) -> None:
        for part in self.parts:
            part.abort()


SENSOR_CLASSES = (RaplSensor, Ina3221Sensor, PmicSensor, NvmlSensor)  # the order `info` lists them in


def energy_sensor_names() -> list[str]:
    """Names of the energy sensors this device can read ("rapl", "ina3221", "rpi5-pmic", "nvml")."""
    return [cls.name for cls in SENSOR_CLASSES if cls.readable()]


def discover_energy_sensor(gpu: bool = False) -> EnergySensor | None:
    """The sensor that measures a benchmark here, or None.

    A whole-board sensor first (Jetson INA3221, Raspberry Pi 5 PMIC); else RAPL for the CPU,
    plus NVML when the model runs on an NVIDIA GPU (`gpu`), their energies added.
    """
    for cls in (Ina3221Sensor, PmicSensor):
        sensor = cls.discover()
        if sensor is not None:
            return sensor
    parts = [s for s in (RaplSensor.discover(), NvmlSensor.discover() if gpu else None) if s is not None]
    if len(parts) > 1:
        return CombinedSensor(parts)
    return parts[0] if parts else None
