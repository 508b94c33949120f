"""Raspberry Pi 5 PMIC ADC through ``vcgencmd pmic_read_adc``, sampled.

The one subprocess of the sensors: each reading starts ``vcgencmd``. The call only runs where the
device tree's model says Raspberry Pi, and its failure (it cannot exec under qemu-user) only
means "no PMIC sensor".
"""

from __future__ import annotations

import re
import shutil
import subprocess

from agents.sensors.base import SampledSensor, SensorError, read_text_file, sys_path

PMIC_LINE = re.compile(r"^\s*(\S+)_([AV])\s+(?:current|volt)\(\d+\)=([-+0-9.eE]+)[AV]\s*$")
DEVICE_TREE_MODEL = ("/sys/firmware/devicetree/base/model", "/proc/device-tree/model")


def parse_pmic_read_adc(text: str) -> dict[str, float]:
    """Watts of each rail in `vcgencmd pmic_read_adc` output: its _V reading x its _A reading.

    Rails with only a voltage (EXT5V_V, BATT_V) have no current reading and are left out.
    """
    amps, volts = {}, {}
    for line in text.splitlines():
        match = PMIC_LINE.match(line)
        if match:
            rail, unit, value = match.groups()
            (amps if unit == "A" else volts)[rail] = float(value)
    return {rail: volts[rail] * amps[rail] for rail in amps if rail in volts}


def vcgencmd_path() -> str | None:
    """The vcgencmd executable found on PATH (a test puts a replaying script first on PATH)."""
    return shutil.which("vcgencmd")


class PmicSensor(SampledSensor):
    """Raspberry Pi 5 PMIC ADC through `vcgencmd pmic_read_adc`: the sum of V x I over its rails.

    The PMIC's output rails (SoC core, DDR, 1V8, 3V3, ...) do not contain each other; their sum
    leaves out what the 5 V input feeds directly (USB, HAT) and the regulators' own losses.
    Each reading starts a process, so it is sampled every 0.2 s and idle is measured for 1 s.
    """

    name = "rpi5-pmic"
    source = "measured:rpi5-pmic"
    interval_s = 0.2
    idle_seconds = 1.0
    TIMEOUT_S = 2.0

    def __init__(self, exe: str, rails: list[str]):
        self.exe = exe
        self.rail = " + ".join(rails)
        self.description = "Raspberry Pi 5 PMIC power, sum of V x I over rails %s" % ", ".join(rails)

    @staticmethod
    def read_adc(exe: str) -> str:
        """The text `vcgencmd pmic_read_adc` prints; SensorError if it cannot run or fails."""
        try:
            proc = subprocess.run([exe, "pmic_read_adc"], capture_output=True, text=True,
                                  timeout=PmicSensor.TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError) as exc:  # cannot exec under qemu-user, timeout, ...
            raise SensorError("vcgencmd pmic_read_adc: %s" % exc)
        if proc.returncode != 0:
            raise SensorError("vcgencmd pmic_read_adc exited %d" % proc.returncode)
        return proc.stdout

    @classmethod
    def discover(cls) -> PmicSensor | None:
        """The PMIC if the device tree says Raspberry Pi and `vcgencmd pmic_read_adc` gives V and I rails."""
        model = next((m for m in (read_text_file(sys_path(p)) for p in DEVICE_TREE_MODEL) if m), "")
        exe = vcgencmd_path()
        if "Raspberry Pi" not in model or exe is None:
            return None
        try:
            rails = parse_pmic_read_adc(cls.read_adc(exe))
        except SensorError:
            return None
        return cls(exe, sorted(rails)) if rails else None  # a Pi 4's vcgencmd has no pmic_read_adc

    def read_watts(self) -> float:
        watts = parse_pmic_read_adc(self.read_adc(self.exe))
        if not watts:
            raise SensorError("vcgencmd pmic_read_adc printed no rails")
        return sum(watts.values())
