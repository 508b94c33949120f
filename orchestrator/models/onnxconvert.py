"""An ONNX file as a torch module, so that training-stage techniques apply to a brought ONNX model.

`convert(path, feeds, reference)` converts with onnx2torch (https://pypi.org/project/onnx2torch/)
and keeps the module only when it agrees with the ONNX model (onnxruntime) on the samples: every
output with a cosine of at least `MIN_COSINE` and a relative error (max |torch - onnx| over
max |onnx|) of at most `MAX_RELATIVE_ERROR`. Otherwise it returns why, in one line, and the run
goes on with graph-stage techniques only (orchestrator/search/fitting.py `refuse_torch_stages`).

Weights held in `Constant` nodes instead of initializers (PaddlePaddle's exports, RapidOCR's
classifier) are moved into initializers first (`constants_as_initializers`): onnx2torch looks a
Conv's weights up among the initializers only (`KeyError: 'conv1_weights'` otherwise). A Softmax
of opset < 13 over the last axis runs as a plain softmax (`_batch_free_softmax`): onnx2torch's
flatten-then-reshape form, traced for export, reshapes back to the traced batch size (a pruned
RapidOCR classifier exported at batch 1 failed at batch 24: `Reshape ... requested shape:{1,2}`).

onnx2torch imports torchvision for two converters only (NonMaxSuppression, RoiAlign). Where
torchvision is missing or cannot load (a CUDA torchvision next to a CPU-only torch), the
conversion still runs; a model with one of those two ops is then refused by the check.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np

#: Agreement a converted module needs with its ONNX model on the samples, per output.
MIN_COSINE = 0.9999
MAX_RELATIVE_ERROR = 1e-3
#: Sample rows the check runs on.
CHECK_ROWS = 32


def _onnx2torch() -> Any:
    """onnx2torch, imported with a stand-in torchvision when the real one cannot be imported."""
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or RuntimeError from a torchvision built for another torch
        why = f"torchvision cannot be imported here ({type(exc).__name__})"

        def unusable(*_args: Any, **_kwargs: Any) -> Any:
            raise RuntimeError(f"{why}: NonMaxSuppression and RoiAlign need it")

        stand_in, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        ops.nms = ops.roi_align = ops.box_convert = unusable  # type: ignore[attr-defined]
        stand_in.ops = ops  # type: ignore[attr-defined]
        saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "torchvision" or k.startswith("torchvision.")}
        sys.modules.update({"torchvision": stand_in, "torchvision.ops": ops})
        try:
            import onnx2torch
        finally:  # the stand-in serves onnx2torch's two converters only, no other importer
            for name in ("torchvision", "torchvision.ops"):
                sys.modules.pop(name, None)
            sys.modules.update(saved)
        return onnx2torch
    import onnx2torch  # heavy: it imports torch and onnx (an optional path: brought ONNX files only)

    return onnx2torch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def agreement(converted: list[Any], reference: list[Any]) -> list[tuple[float, float]]:
    """(cosine, relative error) of each converted output against the ONNX model's."""
    out = []
    for got, want in zip(converted, reference):
        a = np.asarray(got, dtype=np.float64).ravel()
        b = np.asarray(want, dtype=np.float64).ravel()
        if a.shape != b.shape:
            out.append((float("nan"), float("inf")))
            continue
        norms = float(np.linalg.norm(a) * np.linalg.norm(b))
        cosine = float(a @ b / norms) if norms > 0 else (1.0 if np.array_equal(a, b) else 0.0)
        scale = float(np.abs(b).max()) if b.size else 0.0
        diff = float(np.abs(a - b).max()) if b.size else 0.0
        out.append((cosine, diff / scale if scale > 0 else diff))
    return out


def constants_as_initializers(model: Any) -> Any:
    """`model` (an onnx ModelProto) with each top-level `Constant` node holding a tensor (`value`) made an
    initializer of the same name; the same object when it has none."""
    hoisted = [n for n in model.graph.node
               if n.op_type == "Constant" and [a.name for a in n.attribute] == ["value"]]
    if not hoisted:
        return model
    import onnx  # heavy, and needed only here

    for node in hoisted:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node.attribute[0].t)
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
    kept = [n for n in model.graph.node if not (n.op_type == "Constant" and [a.name for a in n.attribute] == ["value"])]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def _batch_free_softmax(module: Any) -> None:
    """Each onnx2torch Softmax/LogSoftmax of opset < 13 in `module` made to skip its flatten and reshape
    when its axis is the input's last (the same values, and no shape baked into an export)."""
    try:
        from onnx2torch.node_converters.activations import OnnxSoftmaxV1V11
    except ImportError:  # another onnx2torch layout: left as it converts
        return

    class LastAxisSoftmax(OnnxSoftmaxV1V11):
        def forward(self, input_tensor: Any) -> Any:
            import torch

            if self.axis in (-1, input_tensor.dim() - 1):
                return torch.log_softmax(input_tensor, -1) if self.is_log else torch.softmax(input_tensor, -1)
            return super().forward(input_tensor)

    for sub in module.modules():
        if type(sub) is OnnxSoftmaxV1V11:
            sub.__class__ = LastAxisSoftmax


def convert(path: str, feeds: dict[str, Any], input_names: list[str], output_names: list[str],
            reference: list[Any]) -> tuple[Any, str]:
    """(torch module in eval mode, "") when the ONNX file at `path` converts and agrees with
    `reference` (its onnxruntime outputs on `feeds`); else (None, why in one line)."""
    import torch

    try:
        onnx2torch = _onnx2torch()
    except Exception as exc:  # noqa: BLE001
        return None, f"onnx2torch is not usable here ({_first_line(exc)})"
    try:
        import onnx  # heavy, and needed only here

        module = onnx2torch.convert(constants_as_initializers(onnx.load(path))).eval()
        _batch_free_softmax(module)
    except Exception as exc:  # noqa: BLE001 - an op onnx2torch has no converter for, an opset it lacks
        return None, f"onnx2torch cannot convert it ({_first_line(exc)})"
    try:
        with torch.no_grad():
            result = module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names))
    except Exception as exc:  # noqa: BLE001
        return None, f"its onnx2torch conversion fails on the samples ({_first_line(exc)})"
    result = [result] if isinstance(result, torch.Tensor) else list(result)
    if len(result) != len(reference):
        return None, f"its onnx2torch conversion returns {len(result)} outputs, the ONNX model {len(reference)}"
    for name, (cosine, relative) in zip(output_names, agreement([t.numpy() for t in result], reference)):
        if not (cosine >= MIN_COSINE and relative <= MAX_RELATIVE_ERROR):
            return None, (f"its onnx2torch conversion disagrees with the ONNX model on the samples ({name}: cosine "
                          f"{cosine:.6f}, relative error {relative:.2e}; needs cosine >= {MIN_COSINE} and relative "
                          f"error <= {MAX_RELATIVE_ERROR:g})")
    return module, ""
