"""A real run that rules a technique out (issue 29 item 4): real training on sklearn digits, real Ray Tune
and Optuna, real pruning and onnxruntime, the real local device; the terminal reporter and results.json
say what was ruled out and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator import hookimpl
from orchestrator.cli.console import TerminalReporter
from orchestrator.config.profile import load_profile
from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.run import RunOptions, execute_run
from orchestrator.search.ruleout import RULE_OUT_AFTER

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


class RuledOut:
    """An event plugin: what the family_ruled_out hook was told."""

    def __init__(self) -> None:
        self.families: list[dict] = []

    @hookimpl
    def family_ruled_out(self, run_id, family):
        self.families.append(family)


def test_a_technique_whose_candidates_all_collapse_is_ruled_out_and_the_run_says_so(ray_local, tmp_path, capsys):
    data = yaml.safe_load((ROOT / "device_profiles" / "x86-host.yaml").read_text())
    # structured pruning of 75% of the channels without fine-tuning wrecks the digits model: every one of
    # its 6 variants (importance x scope) is rejected for accuracy; fp16 and the baseline are fine
    data["search"].update(techniques=["prune-structured", "fp16"], max_pipeline_length=1, trials=7,
                          params={"prune-structured": {"ratio": 0.75, "epochs": 0}}, time_budget_s=None)
    data["measurement"].update(runs=50, final_rounds=3, final_time_budget_s=5)
    profile = tmp_path / "collapse.yaml"
    profile.write_text(yaml.safe_dump(data))
    registry = get_plugin_manager()
    events = RuledOut()
    registry.add_plugin(events, "ruled-out-recorder")
    reporter = TerminalReporter()
    registry.add_plugin(reporter, "terminal-reporter")
    try:  # 2 CPUs: one trial at a time (the local device keeps the other core)
        outcome = execute_run(load_profile(profile), registry, RunOptions(trials=7, num_cpus=2, out_dir=tmp_path))
    finally:
        reporter.close()
    assert outcome.status == "finished", outcome.error
    results = json.loads((outcome.out_dir / "results.json").read_text())
    pruned = [c for c in results["candidates"] if c["pipeline"] and c["pipeline"][0]["technique"] == "prune-structured"]
    # the space is 8 (baseline, fp16, 6 pruned) and the budget 7: without the rule, the sampler would have
    # gone on to a 4th and more pruned variants; with it, none after the third rejection
    assert len(pruned) == RULE_OUT_AFTER and all(c["status"] == "rejected" for c in pruned), pruned
    assert len(results["candidates"]) == 2 + RULE_OUT_AFTER  # baseline, fp16: then nothing was left to try
    [entry] = results["ruled_out"]
    assert entry["family"] == "prune-structured" and entry["reason"] == "quality"
    assert entry["rejected"] == entry["finished"] == RULE_OUT_AFTER
    scores = [c["metrics"]["accuracy"] for c in pruned]
    low, high = min(scores), max(scores)
    assert entry["quality"] == {"metric": "accuracy", "min": low, "max": high}
    assert entry["message"].startswith(f"prune-structured ruled out: rejected for quality in 3 of 3 (accuracy {low:.4f}")
    assert [e["message"] for e in events.families] == [entry["message"]]  # the event, as it happened
    assert entry["message"] in capsys.readouterr().err  # the terminal reporter's line
