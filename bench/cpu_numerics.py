r"""What int8 gives on this CPU: the cosines to fp32 that tests/test_graph_params.py checks, for every setting.

onnxruntime's int8 kernels differ by CPU: on x86-64 without VNNI (AVX2, AVX-512BW) U8S8 adds
pairs of u8 x s8 products in 16 bits (vpmaddubsw), which saturates with full-range int8 weights;
with VNNI the sums are exact (issue 34). This prints, for the tiny BERT-like model of
bench/models.py (the one tests/test_graph_params.py checks; seed 0, 16 evaluation rows), the mean cosine to fp32 of each
quantized model run with this CPU's kernels and, for the QDQ graphs of int8-static, evaluated as
written in float (no integer kernel: the same on every CPU), next to this CPU's agent `info`
(agents/info.py) and the case the tests take for it.

    python bench/cpu_numerics.py [--json bench/results/cpu_numerics.json]

To see another CPU's kernels on this machine, run it under QEMU user mode with that CPU's
CPUID, and a /proc/cpuinfo without the flags that CPU lacks so that the agent reports the same
(root; flags such as avx512_vnni removed with sed first):

    sed -E 's/ (avx512[a-z0-9_]*|avx_vnni|amx_[a-z0-9]*)\b//g' /proc/cpuinfo > /tmp/cpuinfo-avx2
    unshare --mount sh -c 'mount --bind /tmp/cpuinfo-avx2 /proc/cpuinfo &&
        qemu-x86_64-static -cpu EPYC-Rome .venv/bin/python bench/cpu_numerics.py'

(about 3 minutes under QEMU 7.2 on a 2-vCPU AMD EPYC, 30 s natively). bench/results/cpu_numerics.json:
AMD EPYC with AVX-512 VNNI; cpu_numerics_epyc-rome-qemu.json: the same machine under QEMU -cpu EPYC-Rome.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--note", default="", help="how the CPU was provided (e.g. 'QEMU -cpu EPYC-Rome'), in the JSON")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # onnxruntime's quantizer warns about every int64 tensor

    import onnxruntime as ort
    import torch

    from agents.info import cmd_info
    from orchestrator.hooks.manager import get_plugin_manager
    from bench.models import CPU, CPU_CASE, SATURATING_U8S8, cosine, tiny_bert, token_context

    started = time.time()
    info = cmd_info(argparse.Namespace())
    registry = get_plugin_manager()
    static, dynamic = registry.technique("int8-static"), registry.technique("int8-dynamic")
    fusion = registry.technique("transformer-optimize")
    bert = tiny_bert()
    rows: list[dict] = []

    with tempfile.TemporaryDirectory() as tmp:
        ctx = token_context(Path(tmp))

        def row(model_name, technique, params, source, qdq):
            quantized = technique.apply(source, technique.check_params(params), ctx)
            entry = {"model": model_name, "technique": technique.name, "params": params,
                     "kernels": round(cosine(quantized, bert, ctx), 4),
                     "float": round(cosine(quantized, bert, ctx, kernels=False), 4) if qdq else None}
            rows.append(entry)
            label = " ".join(f"{k}={v}" for k, v in params.items() if k != "calibration_samples")
            in_float = "" if entry["float"] is None else format(entry["float"], ".4f")
            print(f"{model_name:<11} {technique.name:<13} {label:<72} {entry['kernels']:.4f}  {in_float}", flush=True)

        print(f"CPU: {info['cpu_model']}; isa {', '.join(info['isa'])}; onnxruntime {ort.__version__}, torch "
              f"{torch.__version__}\ntests' case: {CPU_CASE}\nint8-static recommended here: "
              f"{static.recommended(CPU)[0]}\n")
        print(f"{'model':<11} {'technique':<13} {'params':<72} kernels float(QDQ as written)")
        for reduce_range in (False, True):
            for core in (True, False):
                for fmt in ("QDQ", "QOperator"):
                    params = {"calibration_samples": 32, "reduce_range": reduce_range,
                              "exclude_activation_matmul": core, "quant_format": fmt}
                    row("tiny BERT", static, params, bert, fmt == "QDQ")
        for operators in ("matmul", "matmul+gather"):
            for weight_type in ("int8", "uint8"):
                row("tiny BERT", dynamic, {"operators": operators, "weight_type": weight_type}, bert, False)
        fused = fusion.apply(bert, fusion.check_params({}), ctx)
        for weight_type in ("int8", "uint8"):
            row("fused BERT", dynamic, {"operators": "matmul+gather", "weight_type": weight_type}, fused, False)
        for reduce_range in (False, True):
            row("fused BERT", static, {"calibration_samples": 16, "reduce_range": reduce_range}, fused, True)

    print(f"\n{time.time() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cpu_model": info["cpu_model"], "isa": info["isa"], "note": args.note, "onnxruntime": ort.__version__,
            "torch": torch.__version__, "saturating_u8s8": SATURATING_U8S8, "case": CPU_CASE, "rows": rows,
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
