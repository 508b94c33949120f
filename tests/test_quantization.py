"""int8-static on a tiny real model: it quantizes, keeps the input/output contract, and stays accurate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from orchestrator.api import Dataset, Task, TechniqueContext
from orchestrator.config.profile import load_profile
from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.search.pipeline import export_onnx
from tests.helpers import ROOT


class TinyTask(Task):
    name = "tiny"
    input_shape = (1, 8, 8)


@pytest.fixture(scope="module")
def tiny_model_and_ctx(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 4),
    ).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1, 8, 8)).astype(np.float32)
    data = {"calibration": Dataset(x, np.zeros(64, np.int64))}
    ctx = TechniqueContext(task=TinyTask(), data=data, teacher=model,
                           profile=load_profile(ROOT / "device_profiles" / "x86-host.yaml").profile,
                           scratch_dir=tmp_path_factory.mktemp("scratch"), seed=0)
    return model, ctx, x


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_int8_static_quantizes_and_keeps_contract(tiny_model_and_ctx, per_channel, activations):
    model, ctx, x = tiny_model_and_ctx
    technique = get_plugin_manager().technique("int8-static")
    params = technique.check_params({"per_channel": per_channel, "activations": activations,
                                     "calibration": "minmax", "calibration_samples": 32})
    fp32 = onnx.load_from_string(export_onnx(ctx.task, model))
    int8 = technique.apply(fp32, params, ctx)
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    ref = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(int8.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in got.get_inputs()] == [i.name for i in ref.get_inputs()]
    a = ref.run(None, {"input": x})[0]
    b = got.run(None, {"input": x})[0]
    assert b.shape == a.shape == (64, 4)
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max() + 1e-3


def test_failed_symbolic_shape_inference_leaves_nothing_in_the_working_directory(tmp_path, monkeypatch):
    """onnxruntime dumps a graph its symbolic shape inference cannot finish into the current directory
    (once, 90 MB of it were committed from a checkout): pre-processing runs in the candidate's scratch folder."""
    from onnx import TensorProto, helper, numpy_helper

    from plugins._onnxgraph import prepared

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("NoSuchOp", ["h"], ["y"], domain="com.microsoft")]  # unknown to shape inference
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    user, work = tmp_path / "checkout", tmp_path / "scratch"
    user.mkdir(), work.mkdir()
    monkeypatch.chdir(user)
    with pytest.raises(Exception, match="symbolic shape inference"):
        prepared(model, work, "static")
    assert list(user.iterdir()) == []
    assert Path.cwd() == user
    assert (work / "sym_shape_infer_temp.onnx").exists()
