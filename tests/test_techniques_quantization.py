"""int8-dynamic, fp16, int8-static 7-bit on a tiny CNN: they convert, keep the float32 contract, refuse bad params.

Their transformer side (exclusions, embeddings, int64 inputs) is in tests/test_graph_params.py.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from orchestrator.errors import TechniqueParamsError
from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.search.pipeline import export_onnx
from plugins.digits import DigitsTask
from tests.helpers.techniques import TINY_ARCH, tiny_context


@pytest.fixture(scope="module")
def registry():
    return get_plugin_manager()


@pytest.fixture(scope="module")
def fp32():
    torch.manual_seed(0)
    model = DigitsTask().build(TINY_ARCH).eval()
    return model, onnx.load_from_string(export_onnx(DigitsTask(), model))


def _run(model: onnx.ModelProto, x: np.ndarray) -> tuple[ort.InferenceSession, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, session.run(None, {"input": x})[0]


def _same_contract(ref: ort.InferenceSession, got: ort.InferenceSession) -> None:
    def describe(args):
        return [(a.name, a.type, a.shape) for a in args]

    assert describe(got.get_inputs()) == describe(ref.get_inputs())
    assert describe(got.get_outputs()) == describe(ref.get_outputs())
    assert got.get_inputs()[0].type == "tensor(float)" and got.get_outputs()[0].type == "tensor(float)"


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("weight_type", ["int8", "uint8"])
def test_int8_dynamic_quantizes_convolutions_and_keeps_contract(registry, fp32, tmp_path, per_channel, weight_type):
    torch_model, model = fp32
    ctx = tiny_context(tmp_path, torch_model)
    technique = registry.technique("int8-dynamic")
    quantized = technique.apply(model, technique.check_params({"per_channel": per_channel,
                                                                "weight_type": weight_type}), ctx)
    assert "ConvInteger" in {n.op_type for n in quantized.graph.node}
    x = ctx.data["eval"].inputs[:8]
    ref, a = _run(model, x)
    got, b = _run(quantized, x)
    _same_contract(ref, got)
    assert b.shape == a.shape == (8, 10)
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max() + 1e-3


def test_int8_static_with_reduced_range_keeps_contract(registry, fp32, tmp_path):
    torch_model, model = fp32
    ctx = tiny_context(tmp_path, torch_model)
    technique = registry.technique("int8-static")
    params = technique.check_params({"per_channel": True, "reduce_range": True, "calibration_samples": 32})
    quantized = technique.apply(model, params, ctx)
    x = ctx.data["eval"].inputs[:8]
    ref, a = _run(model, x)
    got, b = _run(quantized, x)
    _same_contract(ref, got)
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max() + 1e-3


@pytest.mark.parametrize(("operators", "names"), [("matmul", "MatMul"), ("matmul+gather", "MatMul/Gather")])
def test_int8_dynamic_refuses_a_model_without_the_operators(registry, fp32, tmp_path, operators, names):
    torch_model, model = fp32
    technique = registry.technique("int8-dynamic")
    params = technique.check_params({"operators": operators})  # the CNN's classifier is a Gemm, not a MatMul
    with pytest.raises(ValueError, match=f"the model has no {names} node to quantize"):
        technique.apply(model, params, tiny_context(tmp_path, torch_model))


def test_int8_dynamic_refuses_when_exclusions_leave_nothing(registry, fp32, tmp_path):
    torch_model, model = fp32
    technique = registry.technique("int8-dynamic")
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    ctx = tiny_context(tmp_path, torch_model)
    with pytest.raises(ValueError, match="the model has no Conv/MatMul node to quantize"):
        technique.apply(model, technique.check_params({"nodes_to_exclude": convs}), ctx)
    with pytest.raises(ValueError, match="the model has no MatMul node to quantize"):
        technique.apply(model, technique.check_params({"exclude_op_types": ["Conv"]}), ctx)
    with pytest.raises(ValueError, match="nodes_to_exclude names no node of this graph: no-such-node"):
        technique.apply(model, technique.check_params({"nodes_to_exclude": ["no-such-node"]}), ctx)


def test_int8_static_has_no_attention_core_in_a_cnn(fp32):
    from plugins.quantization import attention_core

    assert attention_core(fp32[1]) == []  # so the default exclusion leaves a CNN's quantization as it was


def test_int8_static_op_type_lists(registry, fp32, tmp_path):
    torch_model, model = fp32
    technique = registry.technique("int8-static")
    ctx = tiny_context(tmp_path, torch_model)
    convs_only = technique.apply(model, technique.check_params({"op_types": ["Conv"], "calibration_samples": 16}), ctx)
    dequantized = {o for n in convs_only.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    conv = next(n for n in convs_only.graph.node if n.op_type == "Conv")
    gemm = next(n for n in convs_only.graph.node if n.op_type == "Gemm")
    assert conv.input[1] in dequantized and gemm.input[1] not in dequantized  # the classifier's weights stay float
    with pytest.raises(ValueError, match="exclude_op_types leaves no operator type to quantize"):
        technique.apply(model, technique.check_params({"op_types": ["Conv"], "exclude_op_types": ["Conv"]}), ctx)


def test_fp16_halves_the_weights_and_keeps_float32_io(registry, fp32, tmp_path):
    torch_model, model = fp32
    technique = registry.technique("fp16")
    half = technique.apply(model, technique.check_params({}), tiny_context(tmp_path, torch_model))
    assert {t.data_type for t in half.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT}  # the input is untouched
    x = np.random.default_rng(0).standard_normal((4, 1, 32, 32)).astype(np.float32)
    ref, a = _run(model, x)
    got, b = _run(half, x)
    _same_contract(ref, got)
    assert np.abs(a - b).max() < 0.01 * np.abs(a).max() + 1e-3


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("int8-dynamic", {"weight_type": "int4"}, "weight_type='int4' is not one of ['int8', 'uint8']"),
        ("int8-dynamic", {"operators": "gemm"},
         "operators must be one of ['conv+matmul', 'conv+matmul+gather', 'matmul', 'matmul+gather'], got 'gemm'"),
        ("int8-dynamic", {"nodes_to_exclude": "Conv_0"}, "nodes_to_exclude must be a list of names, got 'Conv_0'"),
        ("int8-static", {"op_types": []}, "op_types must be 'all' or a non-empty list of operator types, got []"),
        ("int8-static", {"exclude_op_types": ["Add", 3]}, "exclude_op_types must be a list of names, got ['Add', 3]"),
        ("int8-static", {"exclude_activation_matmul": 1}, "exclude_activation_matmul must be true or false, got 1"),
        ("int8-static", {"quant_format": "QLinear"}, "quant_format='QLinear' is not one of ['QDQ', 'QOperator']"),
        ("int8-dynamic", {"calibration": "minmax"}, "unknown parameter(s) calibration"),
        ("fp16", {"keep_io_types": "yes"}, "keep_io_types must be true or false, got 'yes'"),
        ("fp16", {"bits": 16}, "unknown parameter(s) bits"),
    ],
)
def test_quantization_refuses_bad_params(registry, name, params, message):
    with pytest.raises(TechniqueParamsError, match=f"technique '{name}': " + re.escape(message)):
        registry.technique(name).check_params(params)


def test_quantization_search_space_sizes(registry):
    assert len(registry.technique("int8-static").param_grid()) == 2 * 3 * 2 * 2 * 2
    assert registry.technique("int8-static").param_grid()[0]["quant_format"] == "QDQ"  # QDQ first: the grid's head
    assert len(registry.technique("int8-dynamic").param_grid()) == 2 * 2 * 2
    assert registry.technique("fp16").param_grid() == [{"keep_io_types": True}]


def test_int8_dynamic_recommends_weights_whose_integer_sums_are_exact_on_the_cpu(registry):
    """x86 without VNNI: U8S8 pair sums saturate in 16 bits, so uint8 weights; with VNNI, and on ARM, int8."""
    from orchestrator import DeviceFacts

    technique = registry.techniques["int8-dynamic"]
    transformer = frozenset({"MatMul", "Gather", "Softmax"})
    avx2 = DeviceFacts(arch="x86_64", isa=frozenset({"avx2", "fma"}), model_ops=transformer)
    vnni = DeviceFacts(arch="x86_64", isa=frozenset({"avx2", "avx512_vnni"}), model_ops=transformer)
    arm = DeviceFacts(arch="aarch64", isa=frozenset({"asimd"}), model_ops=transformer)
    assert technique.recommended(avx2) == [{"per_channel": True, "weight_type": "uint8", "embeddings": True}]
    assert technique.recommended(vnni) == [{"per_channel": True, "weight_type": "int8", "embeddings": True}]
    assert technique.recommended(arm) == [{"per_channel": True, "weight_type": "int8", "embeddings": True}]
    cnn = DeviceFacts(arch="x86_64", isa=frozenset({"avx2"}), model_ops=frozenset({"Conv", "MatMul"}))
    assert technique.recommended(cnn) == []
