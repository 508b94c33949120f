"""Instruction-counted latency on emulated Cortex-A72 (rpi4) and Cortex-A76 (rpi5): fp32 against int8, and the
count's determinism under load.

Three modes, each counted with orchestrator/emulation/icount.py (`latency_source: emulated-icount`, one onnxruntime
thread, 1 warm-up + 3 counted runs) and the profile's cost model (uncalibrated: cpi 1.0 x the board's clock):

    python bench/icount_cnn.py                      # a demo-like CNN, fp32 and static QDQ int8, on both CPU models
    python bench/icount_cnn.py --models A.onnx B.onnx ...   # given models (a run's candidates) on both; ratios to A
    python bench/icount_cnn.py --repeat 5 [--models A.onnx]  # determinism: the first model counted 5 times with
                                                    # the host as it is, then 5 times with a spinning process

The default model is like the demo's target (a 32x32 image classifier, three conv blocks, ~100k parameters, random
weights: instruction counts do not depend on the weights' values); int8 is onnxruntime's static QDQ quantization
(per-channel S8S8, calibrated on random inputs). Prints instructions per inference, the cost model's ms and the wall
time of one count; `--repeat` also writes bench/results/icount_determinism.json. Needs qemu-user (dynamic, plugin
support), a C compiler and the arm64 sysroot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROFILES = {"cortex-a72": "rpi4", "cortex-a76": "rpi5"}
RESULTS = ROOT / "bench" / "results" / "icount_determinism.json"


def small_cnn_onnx(path: Path) -> None:
    import torch
    from torch import nn

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1),
                nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

    torch.manual_seed(0)
    net = nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(64, 10)).eval()
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])


def int8_onnx(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.rows = iter([{"input": rng.standard_normal((1, 3, 32, 32), dtype=np.float32)} for _ in range(16)])

        def get_next(self):
            return next(self.rows, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def host() -> dict:
    from agents.info import cpu_model

    return {"cpu_model": cpu_model() or platform.processor(), "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def transport_for(cpu: str, sysroot: Path):
    from orchestrator.config.profile import load_profile
    from orchestrator.devices.base import Device
    from orchestrator.emulation.user import QemuUserTransport

    profile = load_profile(ROOT / "device_profiles" / f"{PROFILES.get(cpu, 'rpi4')}.yaml").profile
    device = Device(name=f"icount-{cpu}", transport="qemu", arch="aarch64", emulated=True)
    return QemuUserTransport(device, sysroot, cpu, 1), profile


def count(cpu: str, sysroot: Path, model: Path) -> dict:
    from orchestrator.emulation.icount import count_bench

    transport, profile = transport_for(cpu, sysroot)
    r = count_bench(transport, model.read_bytes(), profile)
    return {"cpu": cpu, "profile": profile.name, "model": model.name, "instructions": r["instructions"]["median"],
            "spread": r["instructions"]["spread"], "ms": r["latency_ms"]["p50"], "calibrated": r["calibrated"],
            "cost_model": r["cost_model"], "count_seconds": r["count_seconds"]}


def compare(models: list[Path], cpus: list[str], sysroot: Path) -> list[dict]:
    """Each model on each CPU model; ratios to the first model (the reference: the fp32 baseline)."""
    rows = []
    for cpu in cpus:
        for model in models:
            rows.append(count(cpu, sysroot, model))
            print(json.dumps(rows[-1]), flush=True)
    ref = {r["cpu"]: r for r in rows if r["model"] == models[0].name}
    print(f"\n{'cpu':<11} {'model':<28} {'instructions':>13} {'spread':>7} {'ms (uncalibrated)':>18} "
          f"{'ref/model':>9} {'count s':>8}")
    for r in rows:
        ratio = ref[r["cpu"]]["instructions"] / r["instructions"]
        print(f"{r['cpu']:<11} {r['model'][:28]:<28} {r['instructions']:>13,.0f} {r['spread']:>7.4f} {r['ms']:>18.3f} "
              f"{ratio:>8.2f}x {r['count_seconds']:>8.1f}")
    return rows


def spinner() -> subprocess.Popen:
    """A process that keeps one core busy (the other core's work, as another job's would)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def determinism(model: Path, cpu: str, sysroot: Path, repeat: int) -> dict:
    """The same model counted `repeat` times with the host as it is, then `repeat` times with a spinning process."""
    sets: dict[str, list[dict]] = {"as is": [], "one core busy": []}
    for condition, rows in sets.items():
        spin = spinner() if condition == "one core busy" else None
        try:
            time.sleep(1.0 if spin else 0.0)
            for i in range(repeat):
                load = os.getloadavg()[0]
                rows.append({**count(cpu, sysroot, model), "load_average_1min": round(load, 2)})
                print(f"{condition:<14} {i + 1}/{repeat}: {rows[-1]['instructions']:,.0f} instructions, "
                      f"{rows[-1]['ms']:.4f} ms, {rows[-1]['count_seconds']:.1f} s, load {load:.2f}", flush=True)
        finally:
            if spin is not None:
                spin.kill()
                spin.wait()

    def spread(values: list[float]) -> float:
        return (max(values) - min(values)) / float(np.median(values))

    every = [r["instructions"] for rows in sets.values() for r in rows]
    summary = {condition: {"instructions": [r["instructions"] for r in rows], "ms": [r["ms"] for r in rows],
                           "count_seconds": [r["count_seconds"] for r in rows],
                           "load_average_1min": [r["load_average_1min"] for r in rows],
                           "spread": spread([r["instructions"] for r in rows])} for condition, rows in sets.items()}
    result = {"model": model.name, "cpu": cpu, "repeat": repeat, "sets": summary, "spread_all": spread(every),
              "busy_vs_as_is": float(np.median(summary["one core busy"]["instructions"]))
              / float(np.median(summary["as is"]["instructions"])) - 1.0,
              "cost_model": sets["as is"][0]["cost_model"]}
    print(f"\nspread (max - min) / median: as is {summary['as is']['spread']:.4%}, one core busy "
          f"{summary['one core busy']['spread']:.4%}, all {2 * repeat} {result['spread_all']:.4%}; "
          f"median busy vs as is {result['busy_vs_as_is']:+.4%}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sysroot", default=None)
    parser.add_argument("--cpus", default="cortex-a72,cortex-a76")
    parser.add_argument("--models", nargs="+", type=Path, help="ONNX files to count (the first is the reference)")
    parser.add_argument("--repeat", type=int, default=0, help="determinism: count the first model this many times "
                                                              "as is and as many with a spinning process")
    args = parser.parse_args(argv)

    from orchestrator.emulation.sysroot import build_sysroot

    sysroot = build_sysroot(args.sysroot)
    cpus = args.cpus.split(",")
    started = host()
    print(f"host: {started['cpu_model']}, {started['cpus']} CPUs, load average {started['load_average']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models
        if not models:
            fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            small_cnn_onnx(fp32)
            int8_onnx(fp32, int8)
            models = [fp32, int8]
        if args.repeat > 0:
            result = determinism(models[0], cpus[0], sysroot, args.repeat)
            result.update(host_at_start=started, host_at_end=host(), date=time.strftime("%Y-%m-%d"))
            RESULTS.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {RESULTS.relative_to(ROOT)}")
        else:
            compare(models, cpus, sysroot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
