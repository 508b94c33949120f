"""Energy sensors of the on-device agent: which ones this device has, and reading them around the timed runs.

DEPENDENCY NOTE: like ``agents/agent.py``, this module runs on the edge device: standard library only
(numpy is allowed but not needed), Python 3.9 syntax, and no subprocesses except the guarded
``vcgencmd pmic_read_adc`` call on a Raspberry Pi 5 (the agent may run under qemu-user, where
child processes cannot exec, so that call's failure only means "no PMIC sensor").

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

import glob
import importlib
import os
import re
import shutil
import subprocess
import threading
import time

SYSFS_ROOT_ENV = "EDGE_AGENT_SYSFS_ROOT"
IDLE_SECONDS = 0.5
# Fewer power samples than this over the timed runs make a coarse integral: the agent says so.
MIN_POWER_SAMPLES = 5
# Execution providers that run the model on an NVIDIA GPU: only then does NVML's GPU energy count.
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


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


def _number_suffix(path: str) -> int:
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
    return sum((t1 - t0) * (w0 + w1) / 2.0 for (t0, w0), (t1, w1) in zip(samples, samples[1:]))


# --------------------------------------------------------------------------------------------- RAPL


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
        return cls(sorted(zones, key=_number_suffix)) if zones else None

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


# --------------------------------------------------------------------------------------------- NVML


class NvmlSensor(EnergySensor):
    """NVIDIA GPUs' total energy counters through NVML (``nvidia-ml-py``; Volta or newer), in mJ.

    All GPUs NVML sees are added (the CUDA device the model runs on is one of them, whatever
    CUDA_VISIBLE_DEVICES says); idle ones add their idle power, which the idle measurement removes.
    """

    name = "nvml"
    source = "measured:nvml"
    description = "NVML GPU total energy counter"
    DRIVER = "/proc/driver/nvidia/version"

    def __init__(self, nvml, handles: list):
        self.nvml = nvml
        self.handles = handles
        self.rail = " + ".join("gpu%d" % i for i in range(len(handles)))
        if len(handles) > 1:
            self.description = "NVML total energy counters of %d GPUs" % len(handles)
        self._start = None

    @classmethod
    def discover(cls) -> NvmlSensor | None:
        """NVML's GPUs if the NVIDIA driver is loaded, nvidia-ml-py imports and every GPU has the counter."""
        if read_text_file(sys_path(cls.DRIVER)) is None:
            return None
        try:
            nvml = importlib.import_module("pynvml")  # nvidia-ml-py: optional, never required
        except ImportError:
            return None
        try:
            nvml.nvmlInit()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            for handle in handles:
                nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception:  # noqa: BLE001 - NVMLError subclasses: no driver library, GPU older than Volta, ...
            return None
        return cls(nvml, handles) if handles else None

    def read_mj(self) -> list[int]:
        """Each GPU's counter, in millijoules since the driver was loaded."""
        try:
            return [int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self.handles]
        except Exception as exc:  # noqa: BLE001 - NVMLError and its subclasses
            raise SensorError("NVML energy counter: %s" % exc)

    def start(self) -> None:
        self._start = (self.read_mj(), time.perf_counter_ns())

    def stop(self) -> tuple[float, float]:
        after, t1 = self.read_mj(), time.perf_counter_ns()
        before, t0 = self._start
        if any(a < b for a, b in zip(after, before)):
            raise SensorError("NVML energy counter went backwards (driver reloaded?)")
        self.samples = 2
        return sum(a - b for a, b in zip(after, before)) / 1e3, (t1 - t0) / 1e9


# ------------------------------------------------------------------------------------ Jetson INA3221

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
    for name_file in sorted(glob.glob(os.path.join(iio_dir, "rail_name_*")), key=_number_suffix):
        n = _number_suffix(name_file)
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


# ------------------------------------------------------------------------------- Raspberry Pi 5 PMIC

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


# ----------------------------------------------------------------------------------------- discovery


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


# ------------------------------------------------------------------------------------- energy dicts


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
