"""`ort-session`: onnxruntime session settings searched, carried in the model, applied by the agent."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agents.kernel import create_session, denormals_supported
from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.models.modelfacts import session_settings as _session_settings
from orchestrator.search.space import order_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _bench(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "agents", "bench", "--model", str(path), "--warmup", "1", "--runs", "3",
                          "--threads", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_settings_travel_in_the_model_and_the_agent_applies_them(tmp_path, eo_tiny_onnx, eo_technique_context):
    technique = get_plugin_manager().technique("ort-session")
    params = technique.check_params({"graph_optimization_level": "basic", "execution_mode": "parallel",
                                     "intra_op_threads": 2})
    model = technique.apply(eo_tiny_onnx(), params, eo_technique_context)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    expected = {"graph_optimization_level": "basic", "execution_mode": "parallel", "denormal_as_zero": False,
                "intra_op_threads": 2}
    assert _session_settings(path) == expected
    result = _bench(path)
    assert result["session_settings"] == expected
    assert result["threads"]["intra_op"] == 2  # the model's setting wins over --threads 1
    plain = tmp_path / "plain.onnx"
    onnx.save(eo_tiny_onnx(), str(plain))
    assert _bench(plain)["session_settings"] == {} and _session_settings(plain) is None


def test_an_unknown_setting_is_ignored_with_a_warning(tmp_path, eo_tiny_onnx):
    model = eo_tiny_onnx()
    entry = model.metadata_props.add()
    entry.key, entry.value = "edge_orchestrator.session", json.dumps({"graph_optimization_level": "turbo"})
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    result = _bench(path)
    assert result["session_settings"] == {}
    assert any("graph_optimization_level='turbo'" in w for w in result["warnings"])


def test_the_settings_are_written_after_every_other_graph_step():
    registry = get_plugin_manager()
    for other in ("int8-static", "int8-dynamic", "fp16", "transformer-optimize"):
        names = [t.name for t in order_pipeline([registry.technique("ort-session"), registry.technique(other)])]
        assert names == [other, "ort-session"]


def test_bad_thread_counts_are_refused():
    technique = get_plugin_manager().technique("ort-session")
    assert technique.invalid({"intra_op_threads": -1, "inter_op_threads": None})
    assert technique.invalid({"intra_op_threads": True, "inter_op_threads": None})
    assert technique.invalid({"intra_op_threads": None, "inter_op_threads": 4}) is None


def _tiny_product(flush: bool | None) -> onnx.ModelProto:
    """y = x * 1e-20: for x = 1e-20 a denormal (1e-40), or 0 where denormals are flushed."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "c"], ["y"])], "denormal",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.full(4, 1e-20, np.float32), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if flush is not None:
        technique = get_plugin_manager().technique("ort-session")
        model = technique.apply(model, technique.check_params({"denormal_as_zero": flush}), None)
    return model


@pytest.mark.skipif(not denormals_supported(), reason="the agent cannot flush denormals on this CPU")
def test_denormals_are_flushed_for_the_run_of_a_model_that_asks_and_only_for_it(tmp_path):
    x = np.full(4, 1e-20, np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", x=x)
    for flush in (True, False, None):
        path = tmp_path / f"m-{flush}.onnx"
        onnx.save(_tiny_product(flush), str(path))
        out = subprocess.run([sys.executable, "-m", "agents", "run", "--model", str(path), "--inputs",
                              str(tmp_path / "x.npz"), "--outputs", str(tmp_path / "y.npy")],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr
        y = np.load(tmp_path / "y.npy")
        assert (y == 0).all() if flush else (y > 0).all(), (flush, y)
    # in one process (as `compare` interleaves models): each run gets its model's setting, and the
    # thread's state is restored after a flushed run
    sessions = {}
    for flush in (True, False):
        path = tmp_path / f"m-{flush}.onnx"
        sessions[flush] = create_session(str(path), 1, 1, ["CPUExecutionProvider"], [])
    for _ in range(2):
        assert (sessions[True].run(None, {"x": x})[0] == 0).all()
        assert (sessions[False].run(None, {"x": x})[0] > 0).all()
    assert (np.float32(1e-20) * np.float32(1e-20)) > 0  # numpy on this thread too


def test_ort_session_recommends_flushing_for_a_transformer_on_a_cpu():
    from orchestrator import DeviceFacts

    technique = get_plugin_manager().technique("ort-session")
    transformer = DeviceFacts("x86_64", model_ops=frozenset({"MatMul", "Softmax"}))
    assert technique.recommended(transformer) == [{"graph_optimization_level": "all", "execution_mode": "sequential",
                                                   "denormal_as_zero": True}]
    assert technique.recommended(DeviceFacts("x86_64", model_ops=frozenset({"Conv", "MatMul"}))) == []
    assert technique.recommended(DeviceFacts("x86_64", providers=("CUDAExecutionProvider",),
                                             model_ops=frozenset({"MatMul"}))) == []


@pytest.mark.skipif(not denormals_supported(), reason="the agent cannot flush denormals on this CPU")
def test_the_hosts_reference_outputs_run_the_model_as_the_device_does():
    # the rollout's health check and the emulator's parity check compare a device's outputs with the
    # host's: the host runs a model that asks for denormals flushed with them flushed too
    from orchestrator.emulation.rule import host_outputs
    from orchestrator.rollout.healthcheck import reference_data

    x = {"x": np.full(4, 1e-20, np.float32)}
    for flush in (True, False):
        model = _tiny_product(flush).SerializeToString()
        y = host_outputs(model, x)["y"]
        assert (y == 0).all() if flush else (y > 0).all(), (flush, y)
        with np.load(io.BytesIO(reference_data(model, sample=x))) as ref:
            assert np.array_equal(ref["inputs/x"], x["x"])  # the sample fits: the check runs on it
            assert (ref["outputs/y"] == 0).all() if flush else (ref["outputs/y"] > 0).all(), (flush, ref["outputs/y"])
