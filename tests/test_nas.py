"""Architecture search and the per-device latency predictor, on real models measured by the real agent."""

from __future__ import annotations

import onnx
import pytest

from orchestrator.errors import TechniqueParamsError
from orchestrator.search.pipeline import export_onnx
from orchestrator.search.predictor import LatencyPredictor, onnx_features, preview_candidate


def test_nas_builds_and_trains_the_architecture_it_previews(eo_plugin_registry, eo_technique_context, eo_tiny_model,
                                                            eo_evaluate):
    technique = eo_plugin_registry().technique("nas")
    params = technique.check_params({"width": 0.5, "depth": 2, "kernel": 3, "epochs": 4})
    preview = technique.architecture(params, eo_technique_context)
    trained = technique.apply(eo_tiny_model, params, eo_technique_context)
    shapes = lambda m: [tuple(p.shape) for p in m.parameters()]  # noqa: E731
    assert shapes(preview) == shapes(trained) != shapes(eo_tiny_model)
    assert eo_evaluate(export_onnx(eo_technique_context.task, trained)) > 0.5


def test_nas_space_and_bad_params(eo_plugin_registry):
    technique = eo_plugin_registry().technique("nas")
    assert len(technique.param_grid()) == 3 * 3 * 2 * 2
    with pytest.raises(TechniqueParamsError, match="width=0.1 is not one of"):
        technique.check_params({"width": 0.1})


def test_features_count_convolution_work(eo_tiny_task):
    small = onnx_features(export_onnx(eo_tiny_task, eo_tiny_task.build({"width": 4, "blocks": 1})))
    big = onnx_features(export_onnx(eo_tiny_task, eo_tiny_task.build({"width": 8, "blocks": 2})))
    # width x2 => ~4x MACs per block; twice the blocks: clearly more work
    assert big["conv_macs"] > 3 * small["conv_macs"] and big["params"] > small["params"]
    assert small["int8_conv_macs"] == 0


def test_preview_applies_graph_techniques_to_the_untrained_architecture(eo_plugin_registry, eo_tiny_task, eo_tiny_data,
                                                                          eo_tiny_model, eo_technique_context):
    registry = eo_plugin_registry()
    pipeline = [{"technique": "nas", "params": {"width": 0.5, "depth": 1, "kernel": 3, "epochs": 4}},
                {"technique": "int8-static", "params": {"calibration_samples": 16}}]
    ctx = {"data": eo_tiny_data, "profile": eo_technique_context.profile, "seed": 0}
    preview = preview_candidate(registry, eo_tiny_task, eo_tiny_model, pipeline, ctx)
    feats = onnx_features(onnx.load_from_string(preview))
    assert feats["int8_conv_macs"] > 0 and feats["conv_macs"] == 0
    with_training = [{"technique": "prune-structured", "params": {}}] + pipeline
    assert preview_candidate(registry, eo_tiny_task, eo_tiny_model, with_training, ctx) is None


def test_predictor_learns_from_measurements_on_this_machine(eo_tiny_task, eo_local_device):
    """Fit on real agent measurements of several architectures, predict held-out ones."""
    archs = [{"width": w, "blocks": b} for w in (4, 8, 16, 24) for b in (1, 2, 3)]
    measured = []
    for arch in archs:
        model = export_onnx(eo_tiny_task, eo_tiny_task.build(arch))
        measured.append((onnx_features(model), eo_local_device(model)["latency_ms"]["p50"]))
    predictor = LatencyPredictor()
    assert predictor.predict(measured[0][0]) is None  # nothing learnt yet
    for feats, latency in measured[::2]:
        predictor.add(feats, latency)
    for feats, latency in measured[1::2]:
        predictor.checks.append((predictor.predict(feats), latency))
    quality = predictor.quality()
    assert quality["predictions"] == 6
    # On a noisy shared machine we only require the predictor to be useful, not exact:
    assert quality["median_relative_error"] < 0.5, quality


def test_predictor_starts_from_earlier_runs_measurements_of_the_device(eo_tiny_task, eo_tiny_onnx):
    """Measurements cached by a real lease on this machine seed the next run's predictor (same device, same settings)."""
    from orchestrator.config.profile import load_profile
    from orchestrator.devices.local import local_device
    from orchestrator.fleet.lease import DeviceLease
    from orchestrator.fleet.measurements import measurements_path
    from orchestrator.search.predictor import PredictorService, past_points
    from orchestrator.search.trial import ModelSink
    from orchestrator.state.paths import cache_dir

    profile = load_profile("device_profiles/x86-host.yaml").profile.model_copy(
        update={"measurement": load_profile("device_profiles/x86-host.yaml").profile.measurement.model_copy(
            update={"warmup_runs": 3, "runs": 30, "time_budget_s": 1})})
    device = local_device()
    device.name = "predictor-seed-test"
    lease = DeviceLease(device, profile, None, str(measurements_path()))
    sink = ModelSink(str(cache_dir("models")))
    base = eo_tiny_onnx()
    models = [base.SerializeToString()]
    for width in (0.5, 0.75, 1.5, 2.0):
        arch = eo_tiny_task.scaled_arch(width_mult=width)
        models.append(export_onnx(eo_tiny_task, eo_tiny_task.build(arch).eval()))
    for model in models:
        sink.put(model)
        assert "error" not in lease.measure(model)
    points = past_points([device], profile, "p90")
    assert len(points) == len(models)
    service = PredictorService(points)
    assert service.predict(onnx_features(models[1])) is not None  # predicts before this run measured anything
    assert service.quality()["from_earlier_runs"] == len(models) and service.quality()["measurements"] == 0
    other = local_device()
    other.name = "another-device"
    assert past_points([other], profile, "p90") == []  # another device's predictor starts from nothing
