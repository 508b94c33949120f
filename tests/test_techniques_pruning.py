"""prune-structured and prune-magnitude on a tiny residual model: they apply, keep the contract, refuse bad params."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from orchestrator import Dataset
from orchestrator.errors import TechniqueParamsError
from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.search.pipeline import compressed_size, export_onnx
from plugins._batchnorm import recalibrate_batch_norm
from plugins.digits import DigitsTask
from plugins.pruning import output_layers, sparsity_of
from tests.helpers.techniques import TINY_ARCH, check_contract, params_count, tiny_context


@pytest.fixture(scope="module")
def registry():
    return get_plugin_manager()


@pytest.fixture()
def tiny_resnet():
    torch.manual_seed(0)
    return DigitsTask().build(TINY_ARCH).eval()


@pytest.mark.parametrize(("importance", "scope"), [("l1", "layer"), ("l2", "global"), ("taylor", "global")])
def test_structured_pruning_shrinks_a_residual_model_and_keeps_the_contract(registry, tiny_resnet, tmp_path,
                                                                            importance, scope):
    technique = registry.technique("prune-structured")
    ctx = tiny_context(tmp_path, tiny_resnet)
    params = technique.check_params({"ratio": 0.5, "importance": importance, "scope": scope, "epochs": 0})
    before = {k: v.clone() for k, v in tiny_resnet.state_dict().items()}
    pruned = technique.apply(tiny_resnet, params, ctx)
    assert params_count(pruned) < params_count(tiny_resnet)
    assert all(torch.equal(v, tiny_resnet.state_dict()[k]) for k, v in before.items())  # the input is untouched
    # the residual blocks stay consistent: the shortcut and the block's output keep the same channels
    for block in pruned.layers:
        assert block.conv2.out_channels == block.bn2.num_features
        short = block.shortcut[0].out_channels if len(block.shortcut) else block.conv1.in_channels
        assert short == block.conv2.out_channels
    assert pruned.fc.out_features == 10  # the classifier's outputs are never pruned
    check_contract(ctx.task, pruned, ctx.data["eval"].inputs[:5])


def test_structured_pruning_fine_tunes_for_its_epochs(registry, tiny_resnet, tmp_path):
    technique = registry.technique("prune-structured")
    ctx = tiny_context(tmp_path, tiny_resnet)
    pruned = technique.apply(tiny_resnet, technique.check_params({"ratio": 0.5, "epochs": 1}), ctx)
    assert ctx.fine_tune_seconds > 0
    assert not pruned.training


def test_structured_pruning_refuses_to_do_nothing(registry, tmp_path):
    technique = registry.technique("prune-structured")
    torch.manual_seed(0)
    narrow = DigitsTask().build({"widths": [4, 4, 4], "depths": [1, 1, 1], "kernel": 3})
    ctx = tiny_context(tmp_path, narrow)
    with pytest.raises(ValueError, match="nothing to prune at ratio 0.75"):
        technique.apply(narrow, technique.check_params({"ratio": 0.75, "epochs": 0}), ctx)


def test_batch_norm_recalibration_matches_the_data(tiny_resnet):
    x = np.random.default_rng(1).standard_normal((32, 1, 32, 32)).astype(np.float32) * 3 + 1
    recalibrate_batch_norm(tiny_resnet, DigitsTask(), Dataset(x, None), batch=8)
    stem_conv, stem_bn = tiny_resnet.stem[0], tiny_resnet.stem[1]
    with torch.no_grad():
        out = stem_conv(torch.from_numpy(x))
    assert torch.allclose(stem_bn.running_mean, out.mean(dim=(0, 2, 3)), atol=1e-4)
    assert stem_bn.momentum == 0.1 and not tiny_resnet.training


def test_the_output_layers_of_a_classifier_are_its_last_linear(tiny_resnet):
    assert output_layers(tiny_resnet, torch.zeros(1, 1, 32, 32)) == [tiny_resnet.fc]


@pytest.mark.parametrize(("scope", "epochs"), [("layer", 0), ("global", 1)])
def test_magnitude_pruning_zeroes_weights_and_compresses(registry, tiny_resnet, tmp_path, scope, epochs):
    technique = registry.technique("prune-magnitude")
    ctx = tiny_context(tmp_path, tiny_resnet)
    params = technique.check_params({"sparsity": 0.9, "scope": scope, "epochs": epochs})
    pruned = technique.apply(tiny_resnet, params, ctx)
    assert params_count(pruned) == params_count(tiny_resnet)  # shapes kept: no speed on a dense runtime
    assert sparsity_of(pruned) > 0.8  # 90% of all but the classifier, after fine-tuning with masks held
    assert sparsity_of(tiny_resnet) == 0.0
    assert not any(name.endswith("_orig") for name, _ in pruned.named_parameters())  # made permanent
    check_contract(ctx.task, pruned, ctx.data["eval"].inputs[:5])
    # the zeros survive the export (batch norm folded into the convolutions): it compresses better
    dense, sparse = export_onnx(ctx.task, tiny_resnet), export_onnx(ctx.task, pruned)
    assert compressed_size(sparse) < 0.6 * compressed_size(dense)
    weights = [onnx.numpy_helper.to_array(t) for t in onnx.load_from_string(sparse).graph.initializer]
    assert sum((w == 0).sum() for w in weights if w.ndim == 4) > 0.8 * sum(w.size for w in weights if w.ndim == 4)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("prune-structured", {"ratio": 0.6}, "ratio=0.6 is not one of [0.25, 0.5, 0.75]"),
        ("prune-structured", {"importance": "random"}, "importance='random' is not one of"),
        ("prune-structured", {"epochs": 5}, "epochs=5 is not one of [0, 1, 2, 4]"),
        ("prune-structured", {"round_to": 0}, "round_to must be an integer >= 1, got 0"),
        ("prune-structured", {"channels": 3}, "unknown parameter(s) channels"),
        ("prune-magnitude", {"sparsity": 1.0}, "sparsity=1.0 is not one of [0.5, 0.7, 0.9]"),
        ("prune-magnitude", {"scope": "block"}, "scope='block' is not one of ['layer', 'global']"),
        ("prune-magnitude", {"recalibrate_bn": 1}, "recalibrate_bn must be true or false, got 1"),
    ],
)
def test_pruning_refuses_bad_params(registry, name, params, message):
    with pytest.raises(TechniqueParamsError, match=f"technique '{name}': " + __import__("re").escape(message)):
        registry.technique(name).check_params(params)


def test_pruning_search_space_sizes(registry):
    assert len(registry.technique("prune-structured").param_grid()) == 3 * 3 * 2 * 4
    assert len(registry.technique("prune-magnitude").param_grid()) == 3 * 2 * 2
