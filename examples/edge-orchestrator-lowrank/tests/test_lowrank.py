"""The plugin's own tests, written with edge-orchestrator's pytest fixtures (orchestrator.testing)."""

import eo_lowrank
import pytest

from orchestrator import TechniqueParamsError


def test_low_rank_shrinks_and_keeps_accuracy(eo_plugin_registry, eo_technique_context, eo_tiny_model, eo_tiny_task,
                                             eo_evaluate):
    from orchestrator.search.pipeline import export_onnx

    technique = eo_plugin_registry(eo_lowrank).technique("low-rank")
    params = technique.check_params({"rank_ratio": 0.5, "epochs": 1, "min_channels": 8})
    small = technique.apply(eo_tiny_model, params, eo_technique_context)
    before, after = export_onnx(eo_tiny_task, eo_tiny_model), export_onnx(eo_tiny_task, small)
    assert len(after) < len(before)
    assert eo_evaluate(after) > eo_evaluate(before) - 0.1  # one epoch of distillation wins most of it back


def test_bad_rank_is_refused(eo_plugin_registry):
    technique = eo_plugin_registry(eo_lowrank).technique("low-rank")
    with pytest.raises(TechniqueParamsError, match="rank_ratio=0.9 is not one of"):
        technique.check_params({"rank_ratio": 0.9})
