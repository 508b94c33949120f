"""The stage cache with real techniques on the tiny real task: shared prefixes are built once."""

from __future__ import annotations

import copy
import json

from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.search.cache import StageCache
from orchestrator.search.pipeline import build_candidate

REGISTRY = get_plugin_manager()


def _build(ctx, model, pipeline, cache, root="root-key"):
    ctx_kwargs = {"data": ctx.data, "profile": ctx.profile, "seed": 0}
    return build_candidate(REGISTRY, ctx.task, copy.deepcopy(model), pipeline, ctx_kwargs,
                           cache=cache, root_key=root)


def test_candidates_sharing_a_prefix_build_it_once(eo_technique_context, _eo_trained_tiny_model, tmp_path):
    cache = StageCache(tmp_path / "stages")
    prune = {"technique": "prune-magnitude", "params": {"sparsity": 0.5, "epochs": 0}}
    int8 = {"technique": "int8-dynamic", "params": {}}
    fp16 = {"technique": "fp16", "params": {}}

    first, info1 = _build(eo_technique_context, _eo_trained_tiny_model, [prune, int8], cache)
    assert info1["cached_steps"] == []
    again, info2 = _build(eo_technique_context, _eo_trained_tiny_model, [prune, int8], cache)
    assert again == first and info2["cached_steps"] == ["prune-magnitude", "export", "int8-dynamic"]
    assert info2["build_seconds"] == info1["build_seconds"]  # the times of the build that made it

    _, info3 = _build(eo_technique_context, _eo_trained_tiny_model, [prune, fp16], cache)
    assert info3["cached_steps"] == ["prune-magnitude", "export"]  # the shared prefix; fp16 built now

    other_params = {"technique": "prune-magnitude", "params": {"sparsity": 0.7, "epochs": 0}}
    _, info4 = _build(eo_technique_context, _eo_trained_tiny_model, [other_params, fp16], cache)
    assert info4["cached_steps"] == []  # other parameters: another key

    _, info5 = _build(eo_technique_context, _eo_trained_tiny_model, [prune, int8], cache, root="other-base")
    assert info5["cached_steps"] == []  # another base model: nothing shared


def test_a_damaged_entry_is_rebuilt_not_used(eo_technique_context, _eo_trained_tiny_model, tmp_path):
    cache = StageCache(tmp_path / "stages")
    fp16 = [{"technique": "fp16", "params": {}}]
    good, _ = _build(eo_technique_context, _eo_trained_tiny_model, fp16, cache)
    for path in (tmp_path / "stages").glob("*.onnx"):
        path.write_bytes(path.read_bytes()[:100])  # a torn write, a bad disk
    rebuilt, info = _build(eo_technique_context, _eo_trained_tiny_model, fp16, cache)
    assert rebuilt == good and info["cached_steps"] == []
    metas = [json.loads(p.read_text()) for p in (tmp_path / "stages").glob("*.json")]
    assert metas and all(m["kind"] == "onnx" for m in metas)


def test_fresh_reads_nothing(eo_technique_context, _eo_trained_tiny_model, tmp_path):
    fp16 = [{"technique": "fp16", "params": {}}]
    _build(eo_technique_context, _eo_trained_tiny_model, fp16, StageCache(tmp_path / "s"))
    _, info = _build(eo_technique_context, _eo_trained_tiny_model, fp16, StageCache(tmp_path / "s", read=False))
    assert info["cached_steps"] == []
