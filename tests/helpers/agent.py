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


def cnn_graph(batch="N", seed: int = 0, dropout_in_training_mode: bool = False, name: str = "tiny_cnn"):
    """x [batch,1,8,8] -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y [batch,4], weights from `seed`.

    With `dropout_in_training_mode`, a Dropout whose training_mode input is true sits before the
    output, as a model exported with torch in training mode has: each inference zeroes a random
    half of the outputs and doubles the rest, so the outputs never reproduce.
    """
    rng = np.random.default_rng(seed)
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
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits" if dropout_in_training_mode else "y"], transB=1),
    ]
    if dropout_in_training_mode:
        inits += [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
                  numpy_helper.from_array(np.array(True), "training_mode")]
        nodes.append(helper.make_node("Dropout", ["logits", "ratio", "training_mode"], ["y"]))
    return helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
        initializer=inits,
    )


def tiny_cnn(path: Path, batch="N") -> Path:
    """`cnn_graph` saved at `path`."""
    return save_model(cnn_graph(batch), path)


def run_main(capsys, *argv: str):
    """Run the agent's command line in this process: (exit code, its one JSON line parsed, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return code, json.loads(lines[0]), err
