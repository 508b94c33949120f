"""The fixed calibration suite: small ONNX models of different kernels, built from ONNX nodes (no training).

`orchestrate devices calibrate NAME` (orchestrator/emulation/calibrate.py) times every item on the
real board and counts its instructions on the board's emulated twin, then fits the cost model.
The items differ in what the board's onnxruntime dispatches for them: fp32 matrix products of
three sizes, convolutions (dense, depthwise + pointwise), a small CNN, element-wise and softmax
work, and int8 ones (dynamic-quantized matrix products, static QDQ convolutions per channel and
per tensor), so one cycles-per-instruction figure is fitted across kernel kinds, not to one.
Weights come from a fixed seed: the suite is the same bytes on every host, and every item
takes between ~20 us and a few ms natively on one x86 core.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any, Callable

SEED = 0


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any]) -> Any:
    import onnx  # heavy: only when the suite is built
    from onnx import helper

    graph = helper.make_graph(nodes, "calibration", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _io(name: str, shape: list[Any]) -> Any:
    from onnx import TensorProto, helper  # heavy: only when the suite is built

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _w(rng: Any, name: str, shape: tuple[int, ...], scale: float = 0.1) -> Any:
    from onnx import numpy_helper  # heavy: only when the suite is built

    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype("float32"), name)


def mlp(sizes: tuple[int, ...]) -> Any:
    """Fully connected layers (MatMul + Add + Relu) of the given widths."""
    import numpy as np  # heavy: only when the suite is built
    from onnx import helper

    rng = np.random.default_rng(SEED)
    nodes, inits, x = [], [], "input"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        inits += [_w(rng, f"w{i}", (a, b)), _w(rng, f"b{i}", (b,))]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        x = f"a{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["logits"]))
    return _model(nodes, [_io("input", ["batch", sizes[0]])], [_io("logits", ["batch", sizes[-1]])], inits)


def convs(channels: tuple[int, ...], size: int, depthwise: bool = False, head: int = 0) -> Any:
    """3x3 convolutions (+ Relu) over `channels`; `depthwise`: each a depthwise 3x3 then a pointwise 1x1;
    `head`: MaxPool after the first, then global average pool and a `head`-way Gemm."""
    import numpy as np  # heavy: only when the suite is built
    from onnx import helper

    rng = np.random.default_rng(SEED)
    nodes, inits, x = [], [], "input"
    for i, (a, b) in enumerate(zip(channels, channels[1:])):
        if depthwise:
            inits += [_w(rng, f"dw{i}", (a, 1, 3, 3)), _w(rng, f"pw{i}", (b, a, 1, 1))]
            nodes += [helper.make_node("Conv", [x, f"dw{i}"], [f"d{i}"], pads=[1, 1, 1, 1], group=a),
                      helper.make_node("Conv", [f"d{i}", f"pw{i}"], [f"c{i}"])]
        else:
            inits += [_w(rng, f"k{i}", (b, a, 3, 3)), _w(rng, f"kb{i}", (b,))]
            nodes.append(helper.make_node("Conv", [x, f"k{i}", f"kb{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        x = f"r{i}"
        if head and i == 0:
            nodes.append(helper.make_node("MaxPool", [x], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]))
            x = f"p{i}"
    if head:
        inits += [_w(rng, "fc", (channels[-1], head)), _w(rng, "fcb", (head,))]
        nodes += [helper.make_node("GlobalAveragePool", [x], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
                  helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"])]
        out = _io("logits", ["batch", head])
    else:
        nodes.append(helper.make_node("Identity", [x], ["logits"]))
        out = _io("logits", None)
    return _model(nodes, [_io("input", ["batch", channels[0], size, size])], [out], inits)


def elementwise(n: int, steps: int) -> Any:
    """A chain of Mul, Add and Sigmoid over n floats (memory-bound, no matrix kernel)."""
    import numpy as np  # heavy: only when the suite is built
    from onnx import helper

    rng = np.random.default_rng(SEED)
    nodes, inits, x = [], [], "input"
    for i in range(steps):
        inits += [_w(rng, f"s{i}", (n,)), _w(rng, f"o{i}", (n,))]
        nodes += [helper.make_node("Mul", [x, f"s{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"o{i}"], [f"a{i}"]),
                  helper.make_node("Sigmoid", [f"a{i}"], [f"g{i}"])]
        x = f"g{i}"
    nodes.append(helper.make_node("Identity", [x], ["logits"]))
    return _model(nodes, [_io("input", ["batch", n])], [_io("logits", ["batch", n])], inits)


def attention(tokens: int, dim: int) -> Any:
    """Self-attention scores: Q K^T, Softmax, times V (one head)."""
    import numpy as np  # heavy: only when the suite is built
    from onnx import helper

    rng = np.random.default_rng(SEED)
    inits = [_w(rng, n, (dim, dim)) for n in ("wq", "wk", "wv")]
    nodes = [helper.make_node("MatMul", ["input", "wq"], ["q"]), helper.make_node("MatMul", ["input", "wk"], ["k"]),
             helper.make_node("MatMul", ["input", "wv"], ["v"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["logits"])]
    return _model(nodes, [_io("input", ["batch", tokens, dim])], [_io("logits", ["batch", tokens, dim])], inits)


def quantized(model: Any, mode: str, per_channel: bool = True) -> Any:
    """int8 of a float suite model: `dynamic` (weights int8, activations at run time) or `static` (QDQ, calibrated
    on seeded random inputs; per channel or per tensor)."""
    import numpy as np  # heavy: only when the suite is built
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    with tempfile.TemporaryDirectory(prefix="eo-calib-suite-") as tmp:
        src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save(model, src)
        if mode == "dynamic":
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=per_channel)
        else:
            dims = model.graph.input[0].type.tensor_type.shape.dim
            shape = [1] + [d.dim_value for d in dims[1:]]
            rng = np.random.default_rng(SEED)

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.rows = iter([{"input": rng.standard_normal(shape).astype("float32")} for _ in range(8)])

                def get_next(self) -> dict[str, Any] | None:
                    return next(self.rows, None)

            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return onnx.load(dst)


#: (name, kind, builder): the suite, in a fixed order. `kind` groups what the board's runtime dispatches.
SUITE: list[tuple[str, str, Callable[[], Any]]] = [
    ("mlp-256-512-10", "fp32 matmul", lambda: mlp((256, 512, 10))),
    ("mlp-512-1024-10", "fp32 matmul", lambda: mlp((512, 1024, 10))),
    ("mlp-1024x3", "fp32 matmul", lambda: mlp((1024, 1024, 1024, 10))),
    ("conv-3-16-32px", "fp32 conv", lambda: convs((3, 16), 32)),
    ("conv-16-32-32px", "fp32 conv", lambda: convs((16, 32), 32)),
    ("dwconv-32-64-32px", "fp32 depthwise", lambda: convs((32, 64), 32, depthwise=True)),
    ("cnn-3-16-32-10", "fp32 cnn", lambda: convs((3, 16, 32), 32, head=10)),
    ("elementwise-64k", "fp32 elementwise", lambda: elementwise(65536, 3)),
    ("attention-64x64", "fp32 attention", lambda: attention(64, 64)),
    ("mlp-512-1024-10 int8-dynamic", "int8 dynamic", lambda: quantized(mlp((512, 1024, 10)), "dynamic")),
    ("mlp-1024x3 int8-dynamic", "int8 dynamic", lambda: quantized(mlp((1024, 1024, 1024, 10)), "dynamic", False)),
    ("conv-16-32-32px int8-static pc", "int8 static", lambda: quantized(convs((16, 32), 32), "static")),
    ("cnn-3-16-32-10 int8-static pt", "int8 static", lambda: quantized(convs((3, 16, 32), 32, head=10), "static", False)),
]


def suite_models(names: list[str] | None = None) -> list[dict[str, Any]]:
    """The suite's items (all, or those named): name, kind and the model's bytes."""
    out = []
    for name, kind, build in SUITE:
        if names is None or name in names:
            buf = io.BytesIO(build().SerializeToString())
            out.append({"name": name, "kind": kind, "bytes": buf.getvalue()})
    return out
