"""The selection rule for emulated devices (docs/emulation.md): check on ARM, time natively.

An emulated device (QEMU user mode, orchestrator/emulation/user.py) runs the real aarch64 onnxruntime
build, but its latencies are not the board's and do not rank candidates like the board would
(18x to 1700x slower than native, by a factor that depends on the kernels). So a run on an
emulated device uses `EmulatedDeviceTransport`, which for each candidate:

1. **gates it functionally under emulation**: the model must load and run in the aarch64
   onnxruntime and give this host's outputs on a fixed, seeded batch of inputs (float models
   within a relative tolerance, quantized ones with top-1 agreement of at least 0.99); a
   candidate that fails is a failed measurement, `fails on aarch64 onnxruntime: ...`;
2. **measures it natively** on this host (`LocalTransport`, the profile's protocol) and scales
   the latency by the profile's `emulation.latency_scale` (`latency_source: native-scaled`);
   energy is the profile's power model on that latency;
3. **keeps the emulated latency as information** (`emulated_latency_ms`), from a short
   emulated benchmark.

With `emulation.latency: emulated-icount` in the profile, step 2 is instead: **count the guest
instructions** of the candidate's inferences on the emulated CPU model (orchestrator/emulation/icount.py,
one onnxruntime thread) and turn them into milliseconds with the profile's `emulation.cost_model`
(`latency_source: emulated-icount`, `calibrated` as the cost model says; no native measurement).

What `bench` returns has the shape of the agent's bench JSON, plus `emulated`, `latency_source`,
`latency_scale`, `latency_constraint` ("native-scaled" or "unverified" while the scale is 1.0),
`native_latency_ms`, `emulated_latency_ms` and `parity`.
"""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from orchestrator.devices.base import Device
from orchestrator.devices.local import LocalTransport
from orchestrator.emulation import icount
from orchestrator.emulation.sysroot import SysrootBuildError, build_sysroot
from orchestrator.emulation.user import QemuUserTransport, emulated_device_for_profile, qemu_binary
from orchestrator.errors import MeasurementError
from orchestrator.models.modelfacts import model_precision

if TYPE_CHECKING:
    import numpy as np

    from orchestrator.config.profile import Profile

LATENCY_SOURCE = "native-scaled"
PARITY_SAMPLES = 32  # one emulated fp32 run of the demo CNN takes ~0.3 s per sample on a 2-core host
PARITY_SEED = 1234
FLOAT_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # max |emulated - host| / max |host|
MIN_ARGMAX_AGREEMENT = 0.99  # quantized models: ARM and x86 int8 kernels may round differently
EMULATED_INFO_BUDGET_S = 5.0  # the emulated benchmark is information only: a short one


def parity_inputs(model_bytes: bytes, samples: int = PARITY_SAMPLES, seed: int = PARITY_SEED) -> dict[str, np.ndarray]:
    """The inputs of the parity check, as the agent makes them (symbolic batch = `samples` rows): the real
    held-out rows the model carries (repeated to `samples`), else seeded random ones."""
    import onnxruntime as ort

    from agents.kernel import make_inputs

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return make_inputs(session, samples, seed, [])


def host_outputs(model_bytes: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's outputs by name, from this host's onnxruntime (one thread), denormals flushed where
    the model's session settings ask (as the emulated agent runs it)."""
    import onnxruntime as ort

    from agents.kernel import run_as_configured

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, run_as_configured(session)(None, inputs)))


def compare_outputs(host: dict[str, np.ndarray], emulated: dict[str, np.ndarray], precision: str) -> dict[str, Any]:
    """The parity verdict: float models within a relative tolerance, quantized ones by top-1 agreement.

    `relative_diff` is max |emulated - host| / max |host| over every output; `argmax_agreement`
    is over the first output's last axis (when it has one).
    """
    import numpy as np

    missing = sorted(set(host) - set(emulated))
    if missing:
        return {"passed": False, "precision": precision, "reason": f"outputs missing under emulation: {missing}"}
    max_diff, scale = 0.0, 0.0
    for name, ref in host.items():
        got = emulated[name]
        if got.shape != ref.shape:
            return {"passed": False, "precision": precision,
                    "reason": f"output {name} has shape {list(got.shape)}, the host's {list(ref.shape)}"}
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        max_diff = max(max_diff, float(np.abs(got64 - ref64).max(initial=0.0)))
        scale = max(scale, float(np.abs(ref64).max(initial=0.0)))
    relative = max_diff / scale if scale > 0 else max_diff
    first = next(iter(host))
    agreement = None
    if host[first].ndim >= 2:
        agreement = float((host[first].argmax(-1) == emulated[first].argmax(-1)).mean())
    verdict: dict[str, Any] = {"precision": precision, "max_abs_diff": max_diff, "relative_diff": relative,
                               "argmax_agreement": agreement}
    if precision == "int8":
        verdict["rule"] = f"argmax agreement >= {MIN_ARGMAX_AGREEMENT}"
        ok = agreement is None and relative <= 0.05 or agreement is not None and agreement >= MIN_ARGMAX_AGREEMENT
        reason = (f"top-1 agreement with the host {agreement:.3f} < {MIN_ARGMAX_AGREEMENT}" if agreement is not None
                  else f"outputs differ from the host's by {relative:.2%} of their range")
    else:
        tolerance = FLOAT_TOLERANCE.get(precision, FLOAT_TOLERANCE["fp32"])
        verdict["rule"] = f"max |diff| / max |host| <= {tolerance:g}"
        ok = relative <= tolerance
        reason = f"outputs differ from the host's by {relative:.2e} of their range (> {tolerance:g}, {precision})"
    verdict["passed"] = bool(ok)
    if not ok:
        verdict["reason"] = reason
    return verdict


def board_energy(profile: Profile, mean_ms: float, busy: int | None = None, source: str = LATENCY_SOURCE
                 ) -> dict[str, Any]:
    """Energy per inference on the board from the profile's power model (the agent's formula) and a latency."""
    p, cores = profile.power, profile.hardware.cores
    busy = min(profile.runtime.intra_op_threads if busy is None else busy, cores)
    dynamic_w = (p.active_watts - p.idle_watts) * busy / cores
    return {
        "energy_mj": dynamic_w * mean_ms, "source": "estimated",
        "method": f"power model: (active {p.active_watts:.3g} W - idle {p.idle_watts:.3g} W) x {busy}/{cores} "
                  f"busy cores x mean latency ({source})",
        "idle_watts": p.idle_watts, "power_watts": p.idle_watts + dynamic_w, "samples": None, "rail": None,
    }


def counting_fallback(profile: Profile | None) -> str | None:
    """Why a profile that asks for `emulated-icount` falls back to `native-scaled` here (no qemu-aarch64 with
    plugin support, no C compiler), or None: it does not ask, or counting can run."""
    emu = profile.emulation if profile is not None else None
    if emu is None or emu.latency != icount.LATENCY_SOURCE:
        return None
    return icount.unavailable_reason()


def latency_source(profile: Profile | None) -> str:
    """Where an emulated device's latency comes from for this profile: 'emulated-icount' where the profile asks
    for it and counting can run here (`counting_fallback`), else 'native-scaled'."""
    emu = profile.emulation if profile is not None else None
    asks = emu is not None and emu.latency == icount.LATENCY_SOURCE
    return icount.LATENCY_SOURCE if asks and counting_fallback(profile) is None else LATENCY_SOURCE


def fallback_line(profile: Profile | None) -> str | None:
    """The one line a run prints (and results.json keeps) when counting was asked for and cannot run, else None."""
    reason = counting_fallback(profile)
    if reason is None:
        return None
    return (f"emulation.latency asks for {icount.LATENCY_SOURCE}, but instructions cannot be counted here ({reason}): "
            f"latency falls back to {LATENCY_SOURCE}")


def is_current(result: dict[str, Any], profile: Profile) -> bool:
    """Whether a cached measurement of an emulated device was taken the way this run's would be: the same latency
    source and, for counted latency, the same cost model (a calibration stored since changes it)."""
    source = latency_source(profile)
    if result.get("latency_source", source) != source:
        return False
    return source != icount.LATENCY_SOURCE or result.get("cost_model") == asdict(icount.cost_model(profile))


def latency_constraint(profile: Profile) -> str:
    """The latency source when it is calibrated ('native-scaled': latency_scale is not 1.0; 'emulated-icount':
    the cost model says calibrated), else 'unverified'."""
    emu = profile.emulation
    if latency_source(profile) == icount.LATENCY_SOURCE:
        return icount.LATENCY_SOURCE if icount.cost_model(profile).calibrated else "unverified"
    scale = emu.latency_scale if emu else 1.0
    return "unverified" if scale == 1.0 else LATENCY_SOURCE


class EmulatedDeviceTransport:
    """An emulated device as a run measures on it: parity gate under QEMU, latency native x latency_scale."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.emulator = QemuUserTransport.from_device(device)
        self.native = LocalTransport(Device(name=f"{device.name} (native)", transport="local",
                                            arch=platform.machine(), pinned_cpu=device.pinned_cpu))
        self._info: dict[str, Any] | None = None
        self._counts: dict[str, dict[str, Any]] = {}  # model sha256 -> its count this run (deterministic: one is enough)

    def info(self) -> dict[str, Any]:
        """The emulated board's `info` (asked once), plus this host's CPU, which the latency comes from."""
        if self._info is None:
            from agents.info import cpu_model

            self._info = {**self.emulator.info(), "native_arch": platform.machine(), "native_cpu_model": cpu_model()}
        return self._info

    def close(self) -> None:
        """Nothing stays open between agent runs."""

    def run_model(self, model_bytes: bytes, inputs: dict[str, np.ndarray], threads: int = 1) -> dict[str, np.ndarray]:
        """Run a model once under emulation (see `QemuUserTransport.run_model`)."""
        return self.emulator.run_model(model_bytes, inputs, threads)

    def parity(self, model_bytes: bytes, seed: int = PARITY_SEED) -> dict[str, Any]:
        """The functional check: this host's outputs against the aarch64 build's, on seeded inputs."""
        try:
            precision = model_precision(model_bytes)
            inputs = parity_inputs(model_bytes, PARITY_SAMPLES, seed)
            host = host_outputs(model_bytes, inputs)
        except Exception as exc:  # noqa: BLE001 - the host cannot run it either: a broken model
            raise MeasurementError(f"device {self.device.name}: the host's onnxruntime cannot run the model: "
                                   f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
        try:
            emulated = self.emulator.run_model(model_bytes, inputs)
        except MeasurementError as exc:
            reason = str(exc).removeprefix(f"device {self.device.name}: ")
            raise MeasurementError(f"device {self.device.name}: fails on aarch64 onnxruntime: {reason}") from None
        samples = next(iter(inputs.values())).shape[0] if inputs else 0
        verdict = compare_outputs(host, emulated, precision)
        verdict.update(inputs=f"seeded random (seed {seed}; no eval data reaches the device)", samples=int(samples))
        return verdict

    def compare(self, models: list[bytes], profile: Profile) -> dict[str, Any]:
        """The final round, timed natively like `bench` (each model passed the parity gate in its trial), scaled;
        with `emulation.latency: emulated-icount`, each model counted again (its runs are the rounds)."""
        if latency_source(profile) == icount.LATENCY_SOURCE:
            return self._counted_compare(models, profile)
        native_profile = profile.model_copy(deep=True)
        if self.device.pinned_cpu is not None:
            native_profile.runtime.intra_op_threads = 1
        result = self.native.compare(models, native_profile)
        scale = profile.emulation.latency_scale if profile.emulation else 1.0
        for model in result.get("models", []):
            model["rounds_ms"] = {k: [v * scale for v in vs] for k, vs in model["rounds_ms"].items()}
        return {**result, "emulated": True, "latency_source": LATENCY_SOURCE, "latency_scale": scale}

    def _count(self, model_bytes: bytes, profile: Profile) -> dict[str, Any]:
        """The model's count, taken once per run: the search's count is the final round's too."""
        sha = hashlib.sha256(model_bytes).hexdigest()
        counted = self._counts.get(sha)
        if counted is None or counted["cost_model"] != asdict(icount.cost_model(profile)):
            counted = self._counts[sha] = icount.count_bench(self.emulator, model_bytes, profile)
        return counted

    def _counted_compare(self, models: list[bytes], profile: Profile) -> dict[str, Any]:
        started, rows, recounted = time.perf_counter(), [], 0
        for data in models:
            recounted += hashlib.sha256(data).hexdigest() not in self._counts
            counted = self._count(data, profile)
            runs = [icount.cost_model(profile).milliseconds(c) for c in counted["instructions"]["per_run"]]
            rows.append({"sha256": counted["model"]["sha256"], "size_bytes": counted["model"]["size_bytes"],
                         "rounds_ms": {p: runs for p in ("p50", "p90", "p99")}, "runs_per_round": [1] * len(runs),
                         "execution_provider": counted.get("execution_provider"),
                         "instructions": counted["instructions"]})
        # the rounds are each model's counted runs: one count per model per run, the search's where it took one
        return {"models": rows, "rounds": len(rows[0]["rounds_ms"]["p50"]) if rows else 0, "order": "counted",
                "counted_now": recounted,
                "block_runs": 1, "warmup_runs": icount.COUNT_WARMUP_RUNS, "threads": {"intra_op": 1, "inter_op": 1},
                "pinned_cpu": None, "seconds": round(time.perf_counter() - started, 3), "warnings": [],
                "emulated": True, "latency_source": icount.LATENCY_SOURCE,
                "latency_constraint": latency_constraint(profile), "calibrated": icount.cost_model(profile).calibrated}

    def bench(self, model_bytes: bytes, profile: Profile) -> dict[str, Any]:
        """Gate, measure natively, scale; the agent's bench JSON shape plus the emulation keys (module docstring).
        With `emulation.latency: emulated-icount`: gate, then count (`counted_bench`)."""
        name = self.device.name
        info = self.info()
        parity = self.parity(model_bytes, profile.search.seed + PARITY_SEED)
        if not parity["passed"]:
            raise MeasurementError(f"device {name}: fails on aarch64 onnxruntime: {parity['reason']}")
        if latency_source(profile) == icount.LATENCY_SOURCE:
            return self.counted_bench(model_bytes, profile, parity)

        native_profile = profile.model_copy(deep=True)
        threads = profile.runtime.intra_op_threads
        # pinned to one core, one thread: more would only queue on that core
        native_threads = 1 if self.device.pinned_cpu is not None else min(threads, self.emulator.host_cpus or 1)
        native_profile.runtime.intra_op_threads = native_threads
        native = self.native.bench(model_bytes, native_profile)

        short = profile.model_copy(deep=True)
        short.measurement.time_budget_s = min(profile.measurement.time_budget_s, EMULATED_INFO_BUDGET_S)
        try:
            emulated = self.emulator.bench(model_bytes, short)
        except MeasurementError as exc:  # it ran for the parity check: this is the emulator's trouble, say so
            raise MeasurementError(f"device {name}: the emulated benchmark failed after the parity check passed: "
                                   f"{str(exc).removeprefix(f'device {name}: ')}") from None

        scale = profile.emulation.latency_scale if profile.emulation else 1.0
        scaled = {k: (v * scale if k != "cv" else v) for k, v in native["latency_ms"].items()}
        result = {
            **native,
            "latency_ms": scaled,
            "energy": board_energy(profile, scaled["mean"]),
            "arch": info.get("arch"),
            "emulated": True,
            "qemu_cpu": emulated.get("qemu_cpu"),
            "qemu_mode": emulated.get("qemu_mode"),
            "latency_source": LATENCY_SOURCE,
            "latency_scale": scale,
            "latency_constraint": latency_constraint(profile),
            "native_arch": info.get("native_arch"),
            "native_cpu_model": info.get("native_cpu_model"),
            "native_latency_ms": native["latency_ms"],
            "native_protocol": {"threads": native_threads, "profile_threads": threads,
                                "pinned_cpu": native.get("pinned_cpu")},
            "emulated_latency_ms": emulated["latency_ms"],
            "emulated_peak_memory_mb": emulated.get("peak_memory_mb"),
            "emulated_protocol": {**emulated.get("emulated_protocol", {}), "timed_runs": emulated.get("runs"),
                                  "time_budget_s": short.measurement.time_budget_s},
            "parity": parity,
        }
        for key in ("qemu_cpu_requested", "emulation_note"):
            if key in emulated:
                result[key] = emulated[key]
        return result


    def counted_bench(self, model_bytes: bytes, profile: Profile, parity: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
        """Latency from the guest instructions counted on the emulated CPU model and the profile's cost model."""
        counted = self._count(model_bytes, profile)
        labels = self.emulator._labels()
        result = {
            **counted,
            "energy": board_energy(profile, counted["latency_ms"]["mean"], busy=1, source=icount.LATENCY_SOURCE),
            "arch": self.info().get("arch"),
            **labels,
            "latency_constraint": latency_constraint(profile),
            "noisy": False,
            "threads": {"intra_op": 1, "inter_op": 1},
        }
        if parity is not None:
            result["parity"] = parity
        return result


def emulated_fallback(profile: Profile, cpus: int, ray_address: str | None = None) -> tuple[Device | None, str]:
    """The profile's emulated device for a run that has no registered device, and a note; (None, why not) when
    QEMU or the arm64 sysroot is not available (the run then falls back to this machine).

    The sysroot is built on first use (about a minute) and cached. Like the local fallback, the
    device measures on the last core (natively and under emulation) while compression keeps to the others.
    """
    if profile.emulation is None:
        return None, f"profile {profile.name!r} has no emulation section"
    if qemu_binary() is None:
        return None, "qemu-aarch64-static is not installed (apt-get install qemu-user-static)"
    built: list[str] = []
    try:
        sysroot = build_sysroot(log=built.append)
        device = emulated_device_for_profile(f"emulated-{profile.name}", profile, sysroot)
        device.pinned_cpu = cpus - 1 if cpus > 1 and not ray_address else None
        QemuUserTransport.from_device(device)  # the emulator, the sysroot and the CPU model are all there
    except (SysrootBuildError, MeasurementError) as exc:
        return None, str(exc).splitlines()[0]
    return device, ("; arm64 sysroot " + built[-1]) if built else ""


def emulation_note(profile: Profile | None) -> str:
    """What a run on an emulated device measures where (one sentence for the terminal and results.json)."""
    emu = profile.emulation if profile is not None else None
    scale = emu.latency_scale if emu is not None else 1.0
    if latency_source(profile) == icount.LATENCY_SOURCE:
        cm = icount.cost_model(profile)  # a calibration stored for the profile, else the profile's
        return ("EMULATED: each candidate is checked under QEMU (aarch64 onnxruntime, outputs against this host's); "
                f"its latency is the guest instructions counted on the emulated {emu.qemu_cpu} (one thread) x cpi "
                f"{cm.cpi:g} / {cm.clock_mhz:g} MHz (latency_source: {icount.LATENCY_SOURCE}, "
                + (f"calibrated: {cm.source})" if cm.calibrated else
                   "NOT calibrated: an estimate; the latency constraint is unverified)"))
    latency = (f"this host's native measurement (latency_source: {LATENCY_SOURCE}; emulation.latency_scale is 1.0, "
               "not calibrated from a board, so the latency constraint is unverified)" if scale == 1.0 else
               f"this host's native measurement x {scale:g} (latency_source: {LATENCY_SOURCE}, the profile's "
               "emulation.latency_scale)")
    fallback = fallback_line(profile)
    return ((f"{fallback}. " if fallback else "")
            + "EMULATED: each candidate is checked under QEMU (aarch64 onnxruntime, outputs against this host's); "
            f"its latency is {latency}; the emulated latency is kept as information only")
