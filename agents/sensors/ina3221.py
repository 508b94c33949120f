"""Jetson INA3221 power monitor rails in sysfs (the hwmon driver, or the older iio one), sampled."""

from __future__ import annotations

import glob
import os

from agents.sensors.base import SampledSensor, SensorError, number_suffix, read_int_file, read_text_file, sys_path

# The board's input rail on Jetson modules: every other rail is inside it.
INA3221_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")
INA3221_HWMON = ("/sys/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*", "/sys/class/hwmon/hwmon*")
INA3221_IIO = "/sys/bus/i2c/drivers/ina3221*/*/iio:device*"  # JetPack 4 and older (Nano, TX2)


class Ina3221Rail:
    """One INA3221 channel: power from a power file (mW), or bus voltage (mV) x current (mA)."""

    def __init__(self, name: str, volt_path: str | None = None, curr_path: str | None = None,
                 power_path: str | None = None):
        self.name = name
        self.volt_path, self.curr_path, self.power_path = volt_path, curr_path, power_path

    def watts(self) -> float:
        if self.power_path is not None:
            milliwatts = read_int_file(self.power_path)
            if milliwatts is None:
                raise SensorError("cannot read " + self.power_path)
            return milliwatts / 1e3
        millivolts, milliamps = read_int_file(self.volt_path), read_int_file(self.curr_path)
        if millivolts is None or milliamps is None:
            raise SensorError("cannot read %s or %s" % (self.volt_path, self.curr_path))
        return millivolts * milliamps / 1e6


def _hwmon_rails(hwmon_dir: str) -> list[Ina3221Rail]:
    # Channels 1-3 only: in4-in6 are shunt voltages, in7 their sum and curr4 the sum of the currents.
    chip = os.path.basename(os.path.dirname(os.path.dirname(hwmon_dir)))  # e.g. 1-0040
    rails = []
    for n in (1, 2, 3):
        volt, curr = os.path.join(hwmon_dir, "in%d_input" % n), os.path.join(hwmon_dir, "curr%d_input" % n)
        label = read_text_file(os.path.join(hwmon_dir, "in%d_label" % n))
        if label == "NC" or read_int_file(volt) is None or read_int_file(curr) is None:
            continue  # "NC": a channel the carrier board leaves unconnected
        rails.append(Ina3221Rail(label or "%s:in%d" % (chip, n), volt, curr))
    return rails


def _iio_rails(iio_dir: str) -> list[Ina3221Rail]:
    rails = []
    for name_file in sorted(glob.glob(os.path.join(iio_dir, "rail_name_*")), key=number_suffix):
        n = number_suffix(name_file)
        label = read_text_file(name_file)
        power = os.path.join(iio_dir, "in_power%d_input" % n)
        if label and label != "NC" and read_int_file(power) is not None:
            rails.append(Ina3221Rail(label, power_path=power))
    return rails


def ina3221_rails() -> list[Ina3221Rail]:
    """Every readable INA3221 rail under the sysfs root (hwmon driver, or the older iio one)."""
    rails, seen = [], set()
    for pattern, default_name in zip(INA3221_HWMON, ("ina3221", "")):  # the driver's folder says what it is
        for hwmon in sorted(glob.glob(sys_path(pattern))):
            real = os.path.realpath(hwmon)  # /sys/class/hwmon/hwmonN links to the i2c device's
            if real in seen or "ina3221" not in (read_text_file(os.path.join(hwmon, "name")) or default_name):
                continue
            seen.add(real)
            rails += _hwmon_rails(hwmon)
    for iio in sorted(glob.glob(sys_path(INA3221_IIO))):
        rails += _iio_rails(iio)
    return rails


class Ina3221Sensor(SampledSensor):
    """Jetson INA3221 power monitor: the board's input rail, or the sum of the rails when there is none."""

    name = "ina3221"
    source = "measured:ina3221"
    interval_s = 0.02

    def __init__(self, rails: list[Ina3221Rail], summed: bool):
        self.rails = rails
        self.rail = " + ".join(r.name for r in rails)
        if summed:
            self.description = ("Jetson INA3221 power, sum of rails %s (no total-input rail on this board)"
                                % ", ".join(r.name for r in rails))
        else:
            self.description = "Jetson INA3221 power of the board's input rail %s" % self.rail

    @classmethod
    def discover(cls) -> Ina3221Sensor | None:
        """The total-input rail (VDD_IN, POM_5V_IN) if there is one, else every rail summed; None without rails."""
        rails = ina3221_rails()
        total = [r for r in rails if r.name.upper() in INA3221_TOTAL_RAILS]
        if total:
            return cls(total[:1], summed=False)
        return cls(rails, summed=True) if rails else None

    @classmethod
    def readable(cls) -> bool:
        """An INA3221 is present with a readable input (even when no rail has both voltage and current)."""
        patterns = [p + "/in*_input" for p in INA3221_HWMON[:1]] + [INA3221_IIO + "/in_power*_input"]
        for pattern in patterns:
            if any(read_text_file(p) is not None for p in glob.glob(sys_path(pattern))):
                return True
        return any("ina3221" in (read_text_file(p) or "") for p in glob.glob(sys_path("/sys/class/hwmon/*/name")))

    def read_watts(self) -> float:
        return sum(r.watts() for r in self.rails)
