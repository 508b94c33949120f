"""The plugin's own tests, written with edge-orchestrator's pytest fixtures (orchestrator.testing)."""

import eo_lowrank
import pytest
from orchestrator.errors import TechniqueParamsError


def test_low_rank_shrinks_and_keeps_accuracy(plugin_registry, technique_context, tiny_model, tiny_task, evaluate):
    from orchestrator.pipeline import export_onnx

    technique = plugin_registry(eo_lowrank).technique("low-rank")
    params = technique.check_params({"rank_ratio": 0.5, "epochs": 1, "min_channels": 8})
    small = technique.apply(tiny_model, params, technique_context)
    before, after = export_onnx(tiny_task, tiny_model), export_onnx(tiny_task, small)
    assert len(after) < len(before)
    assert evaluate(after) > evaluate(before) - 0.1  # one epoch of distillation wins most of it back


def test_bad_rank_is_refused(plugin_registry):
    technique = plugin_registry(eo_lowrank).technique("low-rank")
    with pytest.raises(TechniqueParamsError, match="rank_ratio=0.9 is not one of"):
        technique.check_params({"rank_ratio": 0.9})
