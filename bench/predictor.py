"""How well the per-device latency predictor predicts, on the measurements a device has accumulated.

Reads every measurement the measurement cache holds for one device and one profile's settings
(what earlier `orchestrate` runs and benchmarks measured there), computes each model's graph
features from the model cache, and scores the predictor (orchestrator/search/predictor.py) two ways:

- leave-one-out: fit on all points but one, predict that one (what a device with this much
  history gets);
- online, in measurement order: predict each point from the points before it (what one run
  starting from nothing gets; the figure results.json reports).

    python bench/predictor.py [--profile device_profiles/x86-host.yaml] [--device NAME]

Prints the share of predictions within ±10% and the median relative error, and writes
bench/results/predictor.json. Needs earlier runs on the device (run the demo or the other
benchmarks first); it measures nothing itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.config.profile import load_profile  # noqa: E402
from orchestrator.devices.base import settings_key
from orchestrator.devices.local import local_device  # noqa: E402
from orchestrator.fleet.measurements import MeasurementCache  # noqa: E402
from orchestrator.search.predictor import LatencyPredictor, onnx_features  # noqa: E402
from orchestrator.state.paths import cache_dir  # noqa: E402


def score(pairs: list[tuple[float, float]]) -> dict:
    errors = [abs(p - m) / m for p, m in pairs if p is not None and m > 0]
    if not errors:
        return {"predictions": 0}
    return {"predictions": len(errors), "within_10_percent": sum(e <= 0.1 for e in errors) / len(errors),
            "median_relative_error": statistics.median(errors)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default=str(ROOT / "device_profiles" / "x86-host.yaml"))
    parser.add_argument("--device", help="device name (default: this machine's local device)")
    args = parser.parse_args()
    profile = load_profile(Path(args.profile)).profile
    device = local_device()
    device.pinned_cpu = (os.cpu_count() or 1) - 1 if (os.cpu_count() or 1) > 1 else None  # as a run pins it
    if args.device:
        device.name = args.device
    percentile = profile.constraints.latency_percentile
    rows = MeasurementCache().for_device(device.name, settings_key(device, profile), limit=10_000)
    rows.reverse()  # oldest first: the order they were measured in
    points = []
    for sha, result in rows:
        path = cache_dir("models") / f"{sha}.onnx"
        if path.exists():
            points.append((onnx_features(path.read_bytes()), result["latency_ms"][percentile]))
    if len(points) < 6:
        print(f"only {len(points)} cached measurements of {device.name} with {profile.name}'s settings: "
              "run `make demo` or bench/search_efficiency.py first", file=sys.stderr)
        return 1
    loo = []
    for i, (features, measured) in enumerate(points):
        predictor = LatencyPredictor(points=points[:i] + points[i + 1:])
        predictor._fit()
        loo.append((predictor.predict(features), measured))
    online, predictor = [], LatencyPredictor()
    for features, measured in points:
        online.append((predictor.predict(features), measured))
        predictor.add(features, measured)
    latencies = [m for _, m in points]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg()[0], "device": device.name, "profile": profile.name,
        "percentile": percentile, "points": len(points),
        "latency_range_ms": [min(latencies), max(latencies)],
        "leave_one_out": score(loo), "online": score(online),
    }
    print(f"{len(points)} measurements of {device.name} ({percentile}, {min(latencies):.3f} to {max(latencies):.3f} ms)")
    for name in ("leave_one_out", "online"):
        s = result[name]
        print(f"  {name:14s} {s['predictions']:4d} predictions, within ±10%: {s.get('within_10_percent', 0):.0%}, "
              f"median relative error {s.get('median_relative_error', 0):.0%}")
    out = ROOT / "bench" / "results" / "predictor.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
