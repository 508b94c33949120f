"""NVIDIA GPUs' total energy counters through NVML (the optional ``nvidia-ml-py``)."""

from __future__ import annotations

import importlib
import time

from agents.sensors.base import EnergySensor, SensorError, read_text_file, sys_path

# Execution providers that run the model on an NVIDIA GPU: only then does NVML's GPU energy count.
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


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
            # nvidia-ml-py: optional, never required, and only imported where the NVIDIA driver is
            # (by name, so no device without it ever tries; tests/test_agent_imports.py allows it).
            nvml = importlib.import_module("pynvml")
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
