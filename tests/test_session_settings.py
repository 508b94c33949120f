"""`ort-session`: onnxruntime session settings searched, carried in the model, applied by the agent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx

from orchestrator.plugins import get_plugin_manager
from orchestrator.modelfacts import session_settings as _session_settings
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
    assert _session_settings(path) == {"graph_optimization_level": "basic", "execution_mode": "parallel",
                                       "intra_op_threads": 2}
    result = _bench(path)
    assert result["session_settings"] == {"graph_optimization_level": "basic", "execution_mode": "parallel",
                                          "intra_op_threads": 2}
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
