"""Graph techniques on a transformer, and technique parameters set by the profile.

A tiny BERT-like model (int64 input_ids and attention_mask, embeddings, two layers of
attention with a float-min mask, GELU feed-forward, LayerNorms), built with torch and
exported as the pipeline exports: static int8 keeps it only with the attention core
excluded, dynamic int8 quantizes its embedding tables, fp16 keeps its int64 inputs,
transformer-optimize fuses it (and refuses a CNN). Then `search.params`: a value fixes a
parameter, a list restricts a searched one, anything else is one clear profile error.

int8 figures depend on the CPU's integer kernels (issue 34). What quantization itself costs is
measured on the QDQ graph evaluated as written, in float (the same on every CPU); what this
CPU's kernels give is measured with the quantizer's settings for this CPU, read from its
agent's `info` (bench/models.py, CPU). bench/cpu_numerics.py prints every figure these tests check;
the tiny BERT is bench/models.py's, which it shares with this test.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from onnx import TensorProto, helper, numpy_helper

from bench.models import CPU, CPU_CASE, HIDDEN, SATURATING_U8S8, SEQ, VOCAB, cosine, tiny_bert, token_context
from orchestrator.config.profile import load_profile
from orchestrator.errors import ProfileError
from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.search.pipeline import build_candidate, export_onnx
from orchestrator.search.space import allowed_techniques, configured_technique, enumerate_candidates
from orchestrator.search.starting import starting_points
from plugins.digits import DigitsTask
from plugins.quantization import attention_core
from tests.helpers import ROOT
from tests.helpers.techniques import TINY_ARCH, tiny_context

# int8 kernels run with this CPU's settings give the float evaluation of the quantized graph within this
# (7-bit weights cost 0.0005 on the tiny BERT below; saturating sums cost 0.017, bench/cpu_numerics.py)
KERNEL_TOLERANCE = 0.005


@pytest.fixture(scope="module")
def registry():
    return get_plugin_manager()


@pytest.fixture(scope="module")
def bert() -> onnx.ModelProto:
    return tiny_bert()


@pytest.fixture()
def ctx(tmp_path):
    return token_context(tmp_path)


def _io_types(model: onnx.ModelProto) -> list[tuple[str, int]]:
    return [(v.name, v.type.tensor_type.elem_type) for v in [*model.graph.input, *model.graph.output]]


# --- int8-static -----------------------------------------------------------------------------------

def test_attention_core_is_the_score_path_between_activation_matmuls(bert):
    core = attention_core(bert)
    ops = sorted(n.op_type for n in bert.graph.node if n.name in core)
    assert ops == ["Add", "Add", "Div", "Div", "MatMul", "MatMul", "MatMul", "MatMul", "Softmax", "Softmax"]


def _static_settings_for_this_cpu(technique, **params) -> dict:
    """int8-static's first recommendation for this CPU (7-bit weights on x86 without VNNI), with `params`."""
    settings = technique.check_params({**technique.recommended(CPU)[0], **params})
    assert settings["reduce_range"] == SATURATING_U8S8 or not CPU.x86, (CPU_CASE, settings)
    return settings


def test_int8_static_keeps_a_transformer_only_with_its_attention_core_in_float(registry, bert, ctx):
    technique = registry.technique("int8-static")
    params = technique.check_params({"calibration_samples": 32})
    assert params["exclude_activation_matmul"] is True and params["quant_format"] == "QDQ"
    assert params["reduce_range"] is False
    # what quantization does, on any CPU: the QDQ graphs evaluated in float (measured 0.997 and 0.921)
    kept_model = technique.apply(bert, params, ctx)
    kept = cosine(kept_model, bert, ctx, kernels=False)
    everything = cosine(technique.apply(bert, {**params, "exclude_activation_matmul": False}, ctx), bert, ctx,
                         kernels=False)
    assert kept >= 0.99, kept
    assert 1 - everything > 10 * (1 - kept), (kept, everything)  # quantizing the attention core costs far more
    # with the quantizer's settings for this CPU, its int8 kernels give the same, in both formats
    settings = _static_settings_for_this_cpu(technique, calibration_samples=32)
    on_cpu = cosine(kept_model if settings == params else technique.apply(bert, settings, ctx), bert, ctx)
    everything_on_cpu = cosine(technique.apply(bert, {**settings, "exclude_activation_matmul": False}, ctx), bert, ctx)
    assert on_cpu >= kept - KERNEL_TOLERANCE, (CPU_CASE, on_cpu, kept)
    assert 1 - everything_on_cpu > 10 * (1 - on_cpu), (CPU_CASE, on_cpu, everything_on_cpu)
    qoperator = technique.apply(bert, {**settings, "quant_format": "QOperator"}, ctx)
    assert any(n.op_type == "QLinearMatMul" for n in qoperator.graph.node)
    assert cosine(qoperator, bert, ctx) >= kept - KERNEL_TOLERANCE, CPU_CASE
    assert _io_types(qoperator) == _io_types(bert)  # int64 ids and mask in, float32 out


def test_int8_static_refuses_unknown_nodes_and_explains_histograms_of_a_mask(registry, bert, ctx):
    technique = registry.technique("int8-static")
    with pytest.raises(ValueError, match="nodes_to_exclude names no node of this graph: nope"):
        technique.apply(bert, technique.check_params({"nodes_to_exclude": ["nope"]}), ctx)
    # the float-min mask has no finite histogram: say what to do instead of numpy's message
    with pytest.raises(ValueError, match="entropy calibration cannot make a histogram .* calibrate with minmax"):
        technique.apply(bert, technique.check_params({"calibration": "entropy", "calibration_samples": 8}), ctx)


# --- int8-dynamic ----------------------------------------------------------------------------------

def test_int8_dynamic_with_gather_quantizes_the_embedding_tables(registry, bert, ctx):
    technique = registry.technique("int8-dynamic")
    tables = sum(numpy_helper.to_array(t).nbytes for t in bert.graph.initializer
                 if any(n.op_type == "Gather" and n.input[0] == t.name for n in bert.graph.node))
    assert tables == (VOCAB + SEQ) * HIDDEN * 4
    matmul = technique.apply(bert, technique.check_params({"operators": "matmul"}), ctx)
    gather = technique.apply(bert, technique.check_params({"operators": "matmul+gather"}), ctx)
    saved = matmul.ByteSize() - gather.ByteSize()
    assert 0.7 * tables < saved < 0.8 * tables  # int8 tables: a quarter of their float32 bytes
    assert _io_types(gather) == _io_types(bert)
    # the tables cost next to nothing on top of the MatMuls (their DequantizeLinear and Gather run in float)
    assert abs(cosine(matmul, bert, ctx) - cosine(gather, bert, ctx)) <= 0.002, CPU_CASE
    # and the whole stays close to fp32 where the weights' integer sums are exact on this CPU (measured 0.999)
    exact = gather if not SATURATING_U8S8 else technique.apply(
        bert, technique.check_params({"operators": "matmul+gather", "weight_type": "uint8"}), ctx)
    assert cosine(exact, bert, ctx) >= 0.99, CPU_CASE
    with pytest.raises(ValueError, match="the model has no Gather node to quantize"):
        technique.apply(bert, technique.check_params({"operators": "matmul+gather", "exclude_op_types": ["MatMul"],
                                                      "nodes_to_exclude": ["/word/Gather", "/pos/Gather"]}), ctx)


# --- fp16 ------------------------------------------------------------------------------------------

def _embedding_model() -> onnx.ModelProto:
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["vectors"], name="embed"),
         helper.make_node("Cast", ["ids"], ["ids_out"], to=TensorProto.INT64, name="ids_copy")],
        "embedding", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["batch", 3, 4]),
         helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["batch", 3])],
        [table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_fp16_never_casts_integer_inputs_or_outputs(registry, ctx, keep_io_types):
    model = _embedding_model()
    technique = registry.technique("fp16")
    half = technique.apply(model, technique.check_params({"keep_io_types": keep_io_types}), ctx)
    types = dict(_io_types(half))
    assert types["ids"] == types["ids_out"] == TensorProto.INT64
    assert types["vectors"] == (TensorProto.FLOAT if keep_io_types else TensorProto.FLOAT16)
    ids = np.array([[1, 2, 9]], np.int64)
    session = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    vectors, ids_out = session.run(None, {"ids": ids})
    assert np.allclose(vectors, numpy_helper.to_array(model.graph.initializer[0])[ids], atol=1e-2)
    assert (ids_out == ids).all()


def test_fp16_keeps_a_transformers_int64_inputs(registry, bert, ctx):
    technique = registry.technique("fp16")
    half = technique.apply(bert, technique.check_params({}), ctx)
    assert _io_types(half) == _io_types(bert)
    assert cosine(half, bert, ctx) >= 0.99


# --- transformer-optimize --------------------------------------------------------------------------

def test_transformer_optimize_fuses_a_bert_like_model_and_quantizers_follow(registry, bert, ctx):
    technique = registry.technique("transformer-optimize")
    fused = technique.apply(bert, technique.check_params({}), ctx)
    ops = {n.op_type for n in fused.graph.node}
    assert {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu"} <= ops
    assert "Attention" not in {n.op_type for n in bert.graph.node}  # the input is untouched
    assert cosine(fused, bert, ctx) > 0.9999 and _io_types(fused) == _io_types(bert)
    # what may follow it: dynamic int8 knows the fused operators (QAttention, QEmbedLayerNormalization);
    # weights whose integer sums are exact on this CPU, as above (measured 0.999)
    dynamic = registry.technique("int8-dynamic")
    weight_type = "uint8" if SATURATING_U8S8 else "int8"
    quantized = dynamic.apply(fused, dynamic.check_params({"operators": "matmul+gather", "weight_type": weight_type}),
                              ctx)
    assert {"QAttention", "QEmbedLayerNormalization"} <= {n.op_type for n in quantized.graph.node}
    assert cosine(quantized, bert, ctx) >= 0.99, CPU_CASE
    # static int8 of the fused graph: this CPU's kernels and settings give its float evaluation (measured 0.999)
    static = registry.technique("int8-static")
    params = static.check_params({"calibration_samples": 16})
    in_float = cosine(static.apply(fused, params, ctx), bert, ctx, kernels=False)
    assert in_float >= 0.99, in_float
    on_cpu = cosine(static.apply(fused, _static_settings_for_this_cpu(static, calibration_samples=16), ctx), bert, ctx)
    assert on_cpu >= in_float - KERNEL_TOLERANCE, (CPU_CASE, on_cpu, in_float)


def test_transformer_optimize_refuses_a_cnn(registry, tmp_path):
    torch.manual_seed(0)
    cnn = DigitsTask().build(TINY_ARCH).eval()
    model = onnx.load_from_string(export_onnx(DigitsTask(), cnn))
    technique = registry.technique("transformer-optimize")
    with pytest.raises(ValueError, match="transformer-optimize fused nothing|has no MatMul"):
        technique.apply(model, technique.check_params({}), tiny_context(tmp_path, cnn))


@pytest.mark.parametrize(("params", "message"), [
    ({"model_type": "resnet"}, "model_type must be one of"),
    ({"opt_level": 99}, "opt_level must be 0, 1 or 2, got 99"),
    ({"num_heads": -1}, "num_heads must be a whole number >= 0"),
    ({"use_gpu": True}, "unknown parameter(s) use_gpu"),
])
def test_transformer_optimize_refuses_bad_params(registry, params, message):
    from orchestrator.errors import TechniqueParamsError

    with pytest.raises(TechniqueParamsError, match=f"technique 'transformer-optimize': {message}".replace("(", r"\(")
                       .replace(")", r"\)")):
        registry.technique("transformer-optimize").check_params(params)


# --- search.params in the profile ------------------------------------------------------------------

def _profile(tmp_path, params, techniques=("int8-static", "int8-dynamic", "fp16", "prune-structured")):
    data = yaml.safe_load((ROOT / "device_profiles" / "x86-host.yaml").read_text())
    data["search"]["techniques"] = list(techniques)
    data["search"]["params"] = params
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_profile(path)


def _by_name(loaded, registry):
    return {t.name: t for t in allowed_techniques(loaded, registry)}


def test_no_params_leaves_the_installed_techniques_as_they_are(registry, tmp_path):
    got = allowed_techniques(_profile(tmp_path, {}), registry)
    assert all(t is registry.techniques[t.name] for t in got)


def test_a_value_fixes_a_parameter_and_a_list_restricts_one(registry, tmp_path):
    loaded = _profile(tmp_path, {
        "int8-static": {"quant_format": "QDQ", "calibration": ["minmax", "percentile"],
                        "calibration_samples": 64, "op_types": ["MatMul", "Gather"]},
        "int8-dynamic": {"operators": "matmul+gather", "per_channel": [True]},
    })
    ts = _by_name(loaded, registry)
    static, dynamic = ts["int8-static"], ts["int8-dynamic"]
    assert len(static.param_grid()) == 2 * 2 * 2 * 2  # per_channel, calibration (2 of 3), activations, reduce_range
    assert {p["quant_format"] for p in static.param_grid()} == {"QDQ"}
    assert {p["calibration"] for p in static.param_grid()} == {"minmax", "percentile"}
    assert all(p["calibration_samples"] == 64 and p["op_types"] == ["MatMul", "Gather"] for p in static.param_grid())
    assert [p["per_channel"] for p in dynamic.param_grid()] == [True] * 4  # weight_type x embeddings left to search
    assert static.check_params({})["calibration_samples"] == 64  # the configured copy's defaults
    # the registry's own techniques are untouched
    assert len(registry.techniques["int8-static"].param_grid()) == 48
    assert registry.techniques["int8-static"].defaults["calibration_samples"] == 128
    # every candidate carries its full params, which the plain technique a build looks up again accepts as they are
    candidates = enumerate_candidates(list(ts.values()), loaded.profile.search.max_pipeline_length)
    for candidate in candidates[:: max(1, len(candidates) // 200)]:
        for step in candidate:
            assert registry.technique(step["technique"]).check_params(step["params"]) == step["params"]


def test_a_fixed_value_moves_the_recommendations_to_it(registry, tmp_path):
    from orchestrator.api import DeviceFacts

    loaded = _profile(tmp_path, {"int8-static": {"quant_format": "QOperator"}}, techniques=("int8-static",))
    techniques = allowed_techniques(loaded, registry)
    space = enumerate_candidates(techniques, 1)
    points = starting_points(techniques, space, DeviceFacts(arch="x86_64", isa=frozenset({"avx2"})), 1)
    assert len(points) == 3  # the baseline and both x86 recommendations, in QOperator format
    assert [p[0]["params"]["quant_format"] for p in points[1:]] == ["QOperator", "QOperator"]


def test_a_profile_value_reaches_the_built_candidate(registry, tmp_path):
    """build_candidate looks the technique up again in the registry: the candidate's params carry the profile's."""
    loaded = _profile(tmp_path, {"int8-static": {"op_types": ["Conv"], "calibration_samples": 16}},
                      techniques=("int8-static",))
    (static,) = allowed_techniques(loaded, registry)
    pipeline = [{"technique": "int8-static", "params": static.param_grid()[0]}]
    torch.manual_seed(0)
    cnn = DigitsTask().build(TINY_ARCH).eval()
    context = tiny_context(tmp_path, cnn, samples=16)
    onnx_bytes, _ = build_candidate(registry, DigitsTask(), cnn, pipeline,
                                    {"data": context.data, "profile": loaded.profile, "seed": 0})
    built = onnx.load_from_string(onnx_bytes)
    dequantized = {o for n in built.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert next(n for n in built.graph.node if n.op_type == "Gemm").input[1] not in dequantized  # Conv only


@pytest.mark.parametrize(("params", "where", "message"), [
    ({"warp-drive": {"x": 1}}, "search.params.warp-drive", "unknown technique 'warp-drive'; installed: "),
    ({"distill": {"epochs": 6}}, "search.params.distill",
     "'distill' is not in search.techniques, so its parameters would not be used"),
    ({"int8-static": {"bits": 4}}, "search.params.int8-static.bits", "unknown parameter of 'int8-static'; it accepts "),
    ({"int8-static": {"calibration": "kl"}}, "search.params.int8-static.calibration",
     "'kl' is not one of ['minmax', 'entropy', 'percentile']"),
    ({"int8-static": {"per_channel": [1]}}, "search.params.int8-static.per_channel", "1 is not one of [True, False]"),
    ({"int8-static": {"activations": []}}, "search.params.int8-static.activations",
     "an empty list leaves nothing to search"),
    ({"int8-static": {"calibration_samples": 2}}, "search.params.int8-static.calibration_samples",
     "calibration_samples must be an integer >= 8, got 2"),
    ({"int8-dynamic": {"operators": "gemm"}}, "search.params.int8-dynamic.operators", "operators must be one of"),
])
def test_bad_params_are_one_line_naming_the_parameter(registry, tmp_path, params, where, message):
    loaded = _profile(tmp_path, params)
    with pytest.raises(ProfileError) as info:
        allowed_techniques(loaded, registry)
    text = str(info.value)
    assert "\n" not in text
    line = next(i for i, row in enumerate(loaded.text.splitlines(), 1) if row.strip().startswith(where.split(".")[-1]))
    assert text.startswith(f"{loaded.path}:{line}: {where}: {message}"), text


def test_configured_technique_without_a_profile(registry):
    technique = configured_technique(registry.techniques["fp16"], {"keep_io_types": False})
    assert technique.param_grid() == [{"keep_io_types": False}] and technique.name == "fp16"
    assert configured_technique(registry.techniques["fp16"], {}) is registry.techniques["fp16"]
