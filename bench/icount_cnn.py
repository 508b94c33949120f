"""Instruction-counted latency of a small CNN, fp32 against int8, on emulated Cortex-A72 and Cortex-A76.

The model is like the demo's target (a 32x32 image classifier, three conv blocks, ~100k parameters,
random weights: instruction counts do not depend on the weights' values); int8 is onnxruntime's
static QDQ quantization (per-channel S8S8, calibrated on random inputs). Each (model, CPU) is
counted once with orchestrator/emulation/icount.py (`latency_source: emulated-icount`) and the
profile's uncalibrated cost model; prints instructions per inference, the cost model's ms, and the
wall time of one count. Needs qemu-user (dynamic, plugin support), a C compiler and the arm64 sysroot.

    python bench/icount_cnn.py [--sysroot DIR] [--cpus cortex-a72,cortex-a76]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROFILES = {"cortex-a72": "rpi4", "cortex-a76": "rpi5"}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sysroot", default=None)
    parser.add_argument("--cpus", default="cortex-a72,cortex-a76")
    args = parser.parse_args(argv)

    from orchestrator.config.profile import load_profile
    from orchestrator.devices.base import Device
    from orchestrator.emulation.icount import count_bench
    from orchestrator.emulation.sysroot import build_sysroot
    from orchestrator.emulation.user import QemuUserTransport

    sysroot = build_sysroot(args.sysroot)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        small_cnn_onnx(fp32)
        int8_onnx(fp32, int8)
        for cpu in args.cpus.split(","):
            profile = load_profile(ROOT / "device_profiles" / f"{PROFILES.get(cpu, 'rpi4')}.yaml").profile
            transport = QemuUserTransport(Device(name=f"icount-{cpu}", transport="qemu", arch="aarch64", emulated=True),
                                          sysroot, cpu, 1)
            for name, path in (("fp32", fp32), ("int8", int8)):
                r = count_bench(transport, path.read_bytes(), profile)
                rows.append({"cpu": cpu, "profile": profile.name, "model": name,
                             "instructions": r["instructions"]["median"],
                             "spread": r["instructions"]["spread"], "ms": r["latency_ms"]["p50"],
                             "calibrated": r["calibrated"], "cost_model": r["cost_model"],
                             "count_seconds": r["count_seconds"]})
                print(json.dumps(rows[-1]), flush=True)
    print(f"{'cpu':<11} {'model':<5} {'instructions':>13} {'spread':>7} {'ms (uncalibrated)':>18} {'count s':>8}")
    for r in rows:
        print(f"{r['cpu']:<11} {r['model']:<5} {r['instructions']:>13,.0f} {r['spread']:>7.4f} {r['ms']:>18.2f} "
              f"{r['count_seconds']:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
