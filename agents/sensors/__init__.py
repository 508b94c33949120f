"""Energy sensors of the on-device agent: which ones this device has, and reading them around the timed runs.

One module per sensor family, all on ``base`` (file access under ``$EDGE_AGENT_SYSFS_ROOT``, the
sensor classes, background sampling):

- ``rapl``: Intel/AMD RAPL package counters;        - ``nvml``: NVIDIA GPU counters (optional pynvml);
- ``ina3221``: Jetson power monitor rails;           - ``rpi_pmic``: Raspberry Pi 5 PMIC (``vcgencmd``);
- ``discover``: which of them a device has;          - ``energy``: the bench result's ``energy`` dict.

Standard library only, Python 3.9 syntax (see agents/kernel.py). The modules of this package import
``agents.sensors.<module>`` directly, never this ``__init__``; other agent modules import from here.
"""

from agents.sensors.base import (
    IDLE_SECONDS,
    MIN_POWER_SAMPLES,
    SYSFS_ROOT_ENV,
    EnergySensor,
    SampledSensor,
    SensorError,
    integrate_power,
    read_int_file,
    read_text_file,
    sys_path,
)
from agents.sensors.discover import CombinedSensor, discover_energy_sensor, energy_sensor_names
from agents.sensors.energy import estimated_energy, measured_energy, unavailable_energy
from agents.sensors.ina3221 import Ina3221Rail, Ina3221Sensor, ina3221_rails
from agents.sensors.nvml import GPU_PROVIDERS, NvmlSensor
from agents.sensors.rapl import RaplSensor
from agents.sensors.rpi_pmic import PmicSensor, parse_pmic_read_adc, vcgencmd_path

__all__ = [
    "GPU_PROVIDERS", "IDLE_SECONDS", "MIN_POWER_SAMPLES", "SYSFS_ROOT_ENV", "CombinedSensor", "EnergySensor",
    "Ina3221Rail", "Ina3221Sensor", "NvmlSensor", "PmicSensor", "RaplSensor", "SampledSensor", "SensorError",
    "discover_energy_sensor", "energy_sensor_names", "estimated_energy", "ina3221_rails", "integrate_power",
    "measured_energy", "parse_pmic_read_adc", "read_int_file", "read_text_file", "sys_path", "unavailable_energy",
    "vcgencmd_path",
]
