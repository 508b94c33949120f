"""model_precision: one rule for the emulated devices' parity check and the rollout's health check."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper

from orchestrator.models.modelfacts import QUANTIZED_OPS, model_precision


def _graph_bytes(op_type: str, weight_type: int = TensorProto.FLOAT) -> bytes:
    weight = helper.make_tensor("w", weight_type, [1], [0.5])
    node = helper.make_node(op_type, ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], initializer=[weight])
    return helper.make_model(graph).SerializeToString()


def test_float_models():
    assert model_precision(_graph_bytes("Add")) == "fp32"
    assert model_precision(_graph_bytes("Add", TensorProto.FLOAT16)) == "fp16"


@pytest.mark.parametrize("op_type", sorted(QUANTIZED_OPS))
def test_every_quantized_op_makes_an_int8_model(op_type):
    assert model_precision(_graph_bytes(op_type)) == "int8"
    assert model_precision(_graph_bytes(op_type, TensorProto.FLOAT16)) == "int8"  # quantized wins over fp16


def test_the_ops_are_those_both_former_copies_knew():
    """The union of the emulation rule's 7 and the health check's 10 op types."""
    assert QUANTIZED_OPS == {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                             "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                             "ConvInteger", "MatMulInteger"}


def test_a_real_quantized_model(eo_tiny_onnx, eo_technique_context, eo_plugin_registry):
    assert model_precision(eo_tiny_onnx().SerializeToString()) == "fp32"
    technique = eo_plugin_registry().technique("int8-dynamic")
    int8 = technique.apply(eo_tiny_onnx(), technique.check_params({}), eo_technique_context)
    assert model_precision(int8.SerializeToString()) == "int8"
