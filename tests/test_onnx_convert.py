"""Any brought model can be trained (issue 29 item 1): an ONNX file becomes a torch module with onnx2torch
where that converts and agrees with the file on the samples; training-stage techniques then apply to it.
Where it does not, the run goes on with graph-stage techniques only and says why in one line."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from onnx import TensorProto, helper

from orchestrator.cli.main import main
from orchestrator.config.profile import load_profile
from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.models.ownmodel import ModelSourceError, OwnModelTask
from orchestrator.search.fitting import refuse_torch_stages
from orchestrator.search.pipeline import build_candidate, evaluate_onnx
from orchestrator.search.space import allowed_techniques
from tests.helpers.own_models import image_samples, small_cnn

ROOT = Path(__file__).resolve().parents[1]
X86 = ROOT / "device_profiles" / "x86-host.yaml"


def _cnn_onnx(path: Path) -> Path:
    torch.onnx.export(small_cnn(), (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


def _nearest_upsample_onnx(path: Path) -> Path:
    """A real model onnx2torch converts but gets wrong: Resize (nearest, asymmetric, nearest_mode
    round_prefer_ceil) becomes torch's nearest interpolation, which floors; then a 1x1 conv."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], rng.standard_normal(12).astype(np.float32))
    scales = helper.make_tensor("s", TensorProto.FLOAT, [4], [1.0, 1.0, 1.5, 1.5])
    graph = helper.make_graph(
        [helper.make_node("Resize", ["input", "", "s"], ["up"], mode="nearest",
                          coordinate_transformation_mode="asymmetric", nearest_mode="round_prefer_ceil"),
         helper.make_node("Conv", ["up", "w"], ["output"])],
        "upsample", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4, 24, 24])], [weight, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _profile(tmp_path: Path, techniques: list[str]) -> Path:
    data = {
        "name": "onnx-convert-test", "hardware": {"arch": "x86_64", "cpu": "any x86-64", "cores": 2, "memory_mb": 4096},
        "runtime": {"intra_op_threads": 1}, "constraints": {"max_accuracy_drop": 1.0},
        "objective": {"metric": "latency_p50"},
        "search": {"techniques": techniques, "trials": 1, "max_pipeline_length": 1},
        "measurement": {"warmup_runs": 5, "runs": 30, "time_budget_s": 2, "final_rounds": 4,
                        "final_time_budget_s": 4, "finalists": 2},
        "power": {"idle_watts": 5, "active_watts": 10, "source": "test"},
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_an_onnx_cnn_is_converted_and_pruned_through_the_pipeline(tmp_path):
    source = _cnn_onnx(tmp_path / "cnn.onnx")
    task = OwnModelTask(str(source), str(image_samples(tmp_path / "img.npz")))
    assert task.not_trainable() == ""
    base = task.build(None)
    assert isinstance(base, onnx.ModelProto)  # the baseline and graph-stage techniques start from the file itself
    converted = task.torch_form()
    assert isinstance(converted, torch.nn.Module)
    data = task.load_data(0)
    ctx = {"data": data, "profile": load_profile(X86).profile, "seed": 0}
    registry = get_plugin_manager()
    pruned, info = build_candidate(registry, task, base, [
        {"technique": "prune-structured", "params": {"ratio": 0.5, "importance": "l1", "scope": "layer",
                                                     "epochs": 1, "recalibrate_bn": False}}], ctx)
    assert "prune-structured" in info["build_seconds"] and "export" in info["build_seconds"]
    conv_channels = [list(i.dims)[0] for i in onnx.load_from_string(pruned).graph.initializer if len(i.dims) == 4]
    original = [list(i.dims)[0] for i in base.graph.initializer if len(i.dims) == 4]
    assert original == [16, 32, 32] and conv_channels == [8, 16, 16], conv_channels  # half the channels cut
    quality = evaluate_onnx(task, pruned, data["eval"])
    assert 0.0 < quality <= 1.0
    # the pruned model runs in onnxruntime with the file's input and output names
    session = ort.InferenceSession(pruned)
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["output"]
    # an int8 candidate of the same file is built from the file itself, with no conversion in between
    graph_only, _ = build_candidate(registry, task, base, [{"technique": "int8-dynamic", "params": {}}], ctx)
    assert any(n.op_type in ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear")
               for n in onnx.load_from_string(graph_only).graph.node)


def test_a_conversion_that_disagrees_with_its_onnx_file_is_refused_with_one_line(tmp_path, caplog):
    source = _nearest_upsample_onnx(tmp_path / "upsample.onnx")
    # pixel noise: on image_samples' smooth 4x4 blocks rounding and flooring pick equal neighbours
    np.savez(tmp_path / "noise.npz", input=np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32))
    task = OwnModelTask(str(source), str(tmp_path / "noise.npz"))
    why = task.not_trainable()
    assert "its onnx2torch conversion disagrees with the ONNX model on the samples (output: cosine" in why
    assert "\n" not in why
    with pytest.raises(ModelSourceError, match="no PyTorch form for training-stage techniques"):
        task.torch_form()
    loaded = load_profile(_profile(tmp_path, ["int8-dynamic", "prune-structured"]))
    techniques = allowed_techniques(loaded, get_plugin_manager())
    with caplog.at_level(logging.WARNING, logger="orchestrator.models.tasks"):
        kept = refuse_torch_stages(loaded, techniques, task)
    assert [t.name for t in kept] == ["int8-dynamic"] and techniques is kept
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("prune-structured left out: ") and "graph-stage techniques only" in line
    assert "disagrees with the ONNX model" in line


def test_an_onnx_op_onnx2torch_has_no_converter_for_is_one_line(tmp_path, capsys):
    graph = helper.make_graph([helper.make_node("Hardmax", ["input"], ["output"], axis=1)], "hardmax",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 10])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "hardmax.onnx"))
    profile = _profile(tmp_path, ["prune-structured"])
    code = main(["--profile", str(profile), "--model", str(tmp_path / "hardmax.onnx"), "--out", str(tmp_path / "runs")])
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "search.techniques[0]: prune-structured change a PyTorch model" in line
    assert "onnx2torch cannot convert it (NotImplementedError: Converter is not implemented" in line
    assert "Hardmax" in line


def test_weights_held_in_constant_nodes_convert(tmp_path):
    """RapidOCR's classifier (a PaddlePaddle export) keeps its weights in Constant nodes, which onnx2torch
    does not look up (KeyError: 'conv1_weights'): they are made initializers first."""
    from orchestrator.models.onnxconvert import convert

    model = onnx.load(str(_cnn_onnx(tmp_path / "cnn.onnx")))
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = constants + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(tmp_path / "constants.onnx"))
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    reference = ort.InferenceSession(str(tmp_path / "constants.onnx")).run(None, {"input": x})
    module, why = convert(str(tmp_path / "constants.onnx"), {"input": x}, ["input"], ["output"], reference)
    assert why == "" and module is not None
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), reference[0], rtol=1e-4, atol=1e-5)


def test_rapidocrs_classifier_converts_and_its_export_takes_any_batch(tmp_path):
    """RapidOCR's text-orientation CNN (a wheel `make setup` installs): its weights are Constant nodes, and
    onnx2torch's opset-11 Softmax (flatten, then reshape to the traced shape) exported at batch 1 failed
    at any other batch (`Reshape ... requested shape:{1,2}`). Over the last axis it is a plain softmax."""
    from orchestrator.models.onnxconvert import convert

    import importlib.util

    if importlib.util.find_spec("rapidocr_onnxruntime") is None:  # found, not imported (it needs cv2)
        pytest.skip("rapidocr-onnxruntime is not installed (make setup installs it)")
    spec = importlib.util.spec_from_file_location("own_models", ROOT / "examples" / "own_models.py")
    own_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(own_models)
    path = str(own_models.ocr_classifier_file())
    x = np.load(own_models.ocr_samples(tmp_path / "ocr.npz", rows=4))["x"]
    reference = ort.InferenceSession(path).run(None, {"x": x})
    output = ort.InferenceSession(path).get_outputs()[0].name
    module, why = convert(path, {"x": x}, ["x"], [output], reference)
    assert why == ""
    torch.onnx.export(module, (torch.from_numpy(x[:1]),), str(tmp_path / "back.onnx"), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    (got,) = ort.InferenceSession(str(tmp_path / "back.onnx")).run(None, {"x": x})
    np.testing.assert_allclose(got, reference[0], rtol=1e-3, atol=1e-4)
