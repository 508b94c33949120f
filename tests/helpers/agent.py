"""Tiny ONNX models for the agent and device tests, and the agent's command line run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper, save

from agents.cli import main


def save_model(graph, path: Path) -> Path:
    """Save `graph` as an opset-17, IR-8 ONNX model at `path`; returns `path`."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


def tiny_cnn(path: Path, batch="N") -> Path:
    """x [batch,1,8,8] -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y [batch,4]."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(np.zeros(2, np.float32), "conv_b"),
        numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(4, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
        initializer=inits,
    )
    return save_model(graph, path)


def run_main(capsys, *argv: str):
    """Run the agent's command line in this process: (exit code, its one JSON line parsed, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return code, json.loads(lines[0]), err
