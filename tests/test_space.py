"""The search space: pipelines across stages, incompatibilities refused up front, ordering, sizes."""

from __future__ import annotations

import pytest

from orchestrator import Technique, hookimpl
from orchestrator.api import STAGE_ORDER
from orchestrator.config.profile import load_profile
from orchestrator.hooks.manager import PluginRegistry, get_plugin_manager
from orchestrator.search.pipeline import CandidateBuildError, build_candidate
from orchestrator.search.space import (
    IncompatiblePipeline,
    allowed_techniques,
    enumerate_candidates,
    order_pipeline,
    pipelines,
)
from tests.helpers import ROOT


def technique(name: str, stage: str, **attrs) -> Technique:
    return type(name.title().replace("-", ""), (Technique,), {"name": name, "stage": stage, **attrs})()


A = technique("arch", "architecture")
T1 = technique("t1", "training")
T2 = technique("t2", "training", cannot_follow=("t1",))
G1 = technique("g1", "graph")
G2 = technique("g2", "graph", incompatible_with=("t1",))


def test_stages_run_in_order_whatever_the_listing():
    assert STAGE_ORDER == ("architecture", "training", "graph")
    assert [t.name for t in order_pipeline([G1, T1, A])] == ["arch", "t1", "g1"]


def test_one_architecture_technique_at_most_but_graph_techniques_stack():
    with pytest.raises(IncompatiblePipeline, match="at most one architecture technique per pipeline, got arch, arch2"):
        order_pipeline([A, technique("arch2", "architecture")])
    assert [t.name for t in order_pipeline([G2, G1])] == ["g2", "g1"]  # the listing's order
    g3 = technique("g3", "graph", cannot_follow=("g1",))
    assert [t.name for t in order_pipeline([G1, g3, T2])] == ["t2", "g3", "g1"]
    with pytest.raises(IncompatiblePipeline, match="g1 and g4 cannot be combined"):
        order_pipeline([G1, technique("g4", "graph", incompatible_with=("g1",))])


@pytest.mark.parametrize("pair", [(T1, G2), (G2, T1)])
def test_incompatible_with_is_refused_whichever_side_declares_it(pair):
    with pytest.raises(IncompatiblePipeline, match="cannot be combined"):
        order_pipeline(list(pair))
    # declared on the other side only: still refused
    mirror = technique("t1", "training", incompatible_with=("g2",))
    with pytest.raises(IncompatiblePipeline):
        order_pipeline([mirror, technique("g2", "graph")])


def test_cannot_follow_orders_a_stage_whatever_the_listing():
    assert [t.name for t in order_pipeline([T1, T2])] == ["t2", "t1"]
    assert [t.name for t in order_pipeline([T2, T1])] == ["t2", "t1"]
    t3 = technique("t3", "training")
    assert [t.name for t in order_pipeline([T1, t3, T2])] == ["t3", "t2", "t1"]  # ties keep the listing


def test_cannot_follow_against_the_stage_order_is_refused():
    graph_first = technique("g3", "graph", cannot_follow=("t1",))
    with pytest.raises(IncompatiblePipeline, match="g3 cannot follow t1, but the training stage runs before"):
        order_pipeline([T1, graph_first])


def test_cannot_follow_cycle_is_refused():
    x = technique("x", "training", cannot_follow=("y",))
    y = technique("y", "training", cannot_follow=("x",))
    with pytest.raises(IncompatiblePipeline, match="cycle among x, y"):
        order_pipeline([x, y])


def test_pipelines_leave_out_what_is_refused():
    got = pipelines([A, T1, T2, G1, G2], max_length=3)
    assert got[0] == ()
    assert ("t2", "t1", "g1") in got and ("arch", "t2", "t1") in got
    assert not any("g2" in p and "t1" in p for p in got)
    assert ("g1", "g2") in got and ("t2", "g1", "g2") in got  # graph techniques stack
    assert len(got) == len(set(got))


def test_a_name_not_installed_is_ignored():
    lone = technique("lone", "training", incompatible_with=("not-installed",), cannot_follow=("nope",))
    assert pipelines([lone, G1], max_length=2) == [(), ("lone",), ("g1",), ("lone", "g1")]


# --- the built-in techniques --------------------------------------------------------------------

BUILTIN = ["int8-static", "int8-dynamic", "fp16", "prune-structured", "prune-magnitude", "distill"]
QUANTIZERS = {"int8-static", "int8-dynamic", "fp16"}


@pytest.fixture(scope="module")
def registry():
    return get_plugin_manager()


def test_builtin_training_order_is_distill_then_structured_then_magnitude(registry):
    techniques = [registry.technique(n) for n in reversed(BUILTIN)]
    got = pipelines(techniques, max_length=4)
    assert ("distill", "prune-structured", "prune-magnitude", "int8-static") in got
    for p in got:
        training = [n for n in p if registry.technique(n).stage == "training"]
        assert training == sorted(training, key=["distill", "prune-structured", "prune-magnitude"].index)


def test_builtin_quantizers_never_share_a_pipeline_and_run_after_the_fusion(registry):
    techniques = [registry.technique(n) for n in [*BUILTIN, "transformer-optimize"]]
    got = pipelines(techniques, max_length=3)
    assert all(len(QUANTIZERS & set(p)) <= 1 for p in got)
    for q in sorted(QUANTIZERS):
        assert ("transformer-optimize", q) in got and (q, "transformer-optimize") not in got
    assert ("prune-structured", "transformer-optimize", "int8-static") in got


def test_builtin_search_space_size(registry):
    ts = {n: registry.technique(n) for n in BUILTIN}
    sizes = {n: len(t.param_grid()) for n, t in ts.items()}
    assert sizes == {"int8-static": 48, "int8-dynamic": 8, "fp16": 1,
                     "prune-structured": 72, "prune-magnitude": 12, "distill": 32}
    graph = 48 + 8 + 1  # one of them per pipeline (declared incompatible with one another)
    ps, pm, kd = sizes["prune-structured"], sizes["prune-magnitude"], sizes["distill"]
    training_sets = [ps, pm, kd, ps * pm, ps * kd, pm * kd, ps * pm * kd]  # every non-empty subset: one order each
    lengths = [1, 1, 1, 2, 2, 2, 3]
    expected_len2 = 1 + graph + ps + pm + kd + graph * (ps + pm + kd) + ps * pm + ps * kd + pm * kd
    assert len(enumerate_candidates(list(ts.values()), max_length=2)) == expected_len2
    expected_len3 = 1 + graph + sum(n * (1 + graph) for n, k in zip(training_sets, lengths) if k <= 2) \
        + training_sets[-1]
    assert len(enumerate_candidates(list(ts.values()), max_length=3)) == expected_len3


@pytest.mark.parametrize("path", sorted((ROOT / "device_profiles").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_profile_has_a_valid_space(registry, path):
    loaded = load_profile(path)
    techniques = allowed_techniques(loaded, registry)
    got = pipelines(techniques, loaded.profile.search.max_pipeline_length)
    assert got[0] == () and len(got) > 1
    for p in got:
        order_pipeline([registry.technique(n) for n in p])  # each one passes the same check the build does


def test_build_refuses_an_incompatible_pipeline_before_any_work():
    class Plugin:
        @hookimpl
        def register_techniques(self, register):
            register(T1)
            register(G2)

    registry = PluginRegistry()
    registry.add_plugin(Plugin(), "test-space")
    pipeline = [{"technique": "t1", "params": {}}, {"technique": "g2", "params": {}}]
    with pytest.raises(CandidateBuildError, match="t1 and g2 cannot be combined"):
        build_candidate(registry, task=None, base_model=None, pipeline=pipeline, ctx_kwargs={})
