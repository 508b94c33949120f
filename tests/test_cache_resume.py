"""The search at scale, with real parts: stage and measurement caches, --fresh, --resume after kill -9,
duplicate trials, a raising trial, and Ray gone afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.cli.main import main
from orchestrator.config.profile import load_profile
from orchestrator.fleet.measurements import MeasurementCache
from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.run import RunOptions, execute_run
from orchestrator.search.searcher import pipeline_key
from orchestrator.state.paths import store_path
from orchestrator.state.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
X86 = ROOT / "device_profiles" / "x86-host.yaml"

pytestmark = pytest.mark.slow


def quick_profile(tmp_path: Path, name: str, **search) -> Path:
    """The x86-host profile with graph-stage techniques only (no fine-tuning) and a short measurement."""
    data = yaml.safe_load(X86.read_text())
    data["name"] = name
    data["search"].update({"techniques": ["int8-static", "int8-dynamic", "fp16"], "max_pipeline_length": 1,
                           "time_budget_s": 600, **search})
    data["measurement"].update({"warmup_runs": 5, "runs": 40, "time_budget_s": 2})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def ok(candidates):
    return [c for c in candidates if c["status"] == "ok"]


def test_second_run_measures_nothing_again_and_fresh_does(ray_local, tmp_path):
    profile = load_profile(quick_profile(tmp_path, "cache-twice"))
    registry = get_plugin_manager()
    cache = MeasurementCache()
    before = cache.count()
    first = execute_run(profile, registry, RunOptions(trials=4, out_dir=tmp_path / "a"))
    assert first.status == "finished", first.error
    assert len(ok(first.candidates)) == 4
    measured = cache.count()
    assert measured - before == len({c["model_sha256"] for c in ok(first.candidates)})

    second = execute_run(profile, registry, RunOptions(trials=4, out_dir=tmp_path / "b"))
    assert second.status == "finished", second.error
    assert cache.count() == measured, "the second run measured something it already had"
    assert {pipeline_key(c["pipeline"]) for c in second.candidates} == {pipeline_key(c["pipeline"]) for c in first.candidates}
    for c in ok(second.candidates):
        assert c["cached"]["measurement"] and c["cached"]["accuracy"], c["id"]
        assert c["cached"]["steps"] and c["cached"]["steps"][-1] in ("export", c["pipeline"][-1]["technique"] if c["pipeline"] else "export")
        same = next(f for f in first.candidates if pipeline_key(f["pipeline"]) == pipeline_key(c["pipeline"]))
        assert c["metrics"]["latency_ms"] == same["metrics"]["latency_ms"]  # the very same measurement

    fresh = execute_run(profile, registry, RunOptions(trials=4, out_dir=tmp_path / "c", fresh=True))
    assert fresh.status == "finished", fresh.error
    for c in ok(fresh.candidates):
        assert not c["cached"]["measurement"] and not c["cached"]["accuracy"] and not c["cached"]["steps"]


def test_duplicates_proposed_by_optuna_are_not_counted(ray_local, tmp_path):
    """A small categorical space makes TPE propose pipelines twice; the run still has `trials` distinct candidates."""
    profile = load_profile(quick_profile(tmp_path, "dups", techniques=["fp16", "int8-dynamic"]))
    outcome = execute_run(profile, get_plugin_manager(), RunOptions(trials=2, out_dir=tmp_path))
    assert outcome.status == "finished", outcome.error
    keys = [pipeline_key(c["pipeline"]) for c in outcome.candidates]
    assert len(keys) == len(set(keys)) == 2
    assert [c["id"] for c in outcome.candidates] == ["c000", "c001"]


EXPLODING_PLUGIN = """
from orchestrator import hookimpl
from orchestrator.api import Technique


class Explodes(Technique):
    name = "explodes"
    stage = "graph"
    description = "raises in apply (a test plugin)"

    def apply(self, model, params, ctx):
        raise RuntimeError("boom from a plugin")


@hookimpl
def register_techniques(register):
    register(Explodes())
"""


def test_a_trial_that_raises_does_not_stop_the_search(tmp_path):
    """A technique whose apply raises, installed as a real distribution (entry point) on PYTHONPATH,
    so Ray's workers load it the way they load any third-party plugin: that candidate fails, the others finish."""
    site = tmp_path / "site"
    (site / "explode_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "explode_plugin.py").write_text(EXPLODING_PLUGIN)
    (site / "explode_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: explode-plugin\nVersion: 0.1\n")
    (site / "explode_plugin-0.1.dist-info" / "entry_points.txt").write_text("[edge_orchestrator]\nexplode = explode_plugin\n")
    profile = quick_profile(tmp_path, "raises", techniques=["explodes", "fp16"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "--profile", str(profile), "--trials", "3",
                           "--out", str(tmp_path / "runs")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "runs").glob("*/results.json")).read_text())
    failed = [c for c in results["candidates"] if c["status"] == "failed"]
    assert len(failed) == 1 and "boom from a plugin" in failed[0]["error"], failed
    assert len(ok(results["candidates"])) == 2  # the baseline and fp16 were measured all the same


def _wait_for_candidates(proc, out_dir: Path, count: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(store_path()) as conn:
                row = conn.execute(
                    "SELECT r.id, COUNT(c.id) FROM runs r LEFT JOIN candidates c ON c.run_id = r.id "
                    "WHERE r.out_dir LIKE ? GROUP BY r.id", (str(out_dir) + "%",)).fetchone()
        except sqlite3.OperationalError:  # the run has not created the store yet (the first test of a session)
            row = None
        if row and row[1] >= count:
            return row[0]
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"the run never stored {count} candidates: {proc.communicate()[1][-2000:]}")


def _measured_models() -> set[str]:
    with sqlite3.connect(MeasurementCache().path) as conn:
        return {row[0] for row in conn.execute("SELECT model_sha256 FROM measurements")}


def _as_measured(seed: int):
    """model sha256 -> the sha256 of the copy a device measures: the digits task's first held-out rows attached."""
    import hashlib

    from orchestrator.models.modelfacts import with_sample
    from orchestrator.state.paths import cache_dir
    from orchestrator.state.store import SAMPLE_ROWS

    task = get_plugin_manager().task("digits")
    sample = task.feeds(task.load_data(seed)["eval"].rows(0, SAMPLE_ROWS))

    def sha(model_sha: str) -> str:
        model = (cache_dir("models") / f"{model_sha}.onnx").read_bytes()
        return hashlib.sha256(with_sample(model, sample)).hexdigest()
    return sha


def _ray_leftovers(ray_tmp: Path, wait_s: float = 20) -> list[str]:
    deadline = time.monotonic() + wait_s
    while True:
        found = subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True, text=True).stdout.split()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_resume_after_sigkill_finishes_without_repeating_trials(tmp_path, capsys):
    """kill -9 of a real `orchestrate` process mid-run, then `orchestrate --resume RUN_ID`.

    The run was started with a relative profile path; the resume runs from another folder, after
    the profile file was overwritten: it goes on with the profile the run started with.
    """
    profile = quick_profile(tmp_path, "resume-kill9")
    out = tmp_path / "runs"
    ray_tmp = Path(tempfile.mkdtemp(prefix="eo-ray-", dir="/tmp"))  # short: Ray's unix socket paths
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    command = [sys.executable, "-m", "orchestrator", "--profile", profile.name, "--trials", "6", "--out", str(out)]
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id = _wait_for_candidates(proc, out, 2, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _ray_leftovers(ray_tmp) == [], "Ray processes outlived the killed driver"

    before = RunStore(store_path()).get_run(run_id)
    assert before["status"] == "running" and 2 <= len(before["candidates"]) < 6
    kept = {c["id"]: c for c in before["candidates"]}
    measured_before = _measured_models()
    assert before["profile_path"] == str(profile.resolve())
    started_with = load_profile(profile).profile
    profile.write_text("search: [this is not the profile the run started with\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    resumed = subprocess.run([sys.executable, "-m", "orchestrator", "--resume", run_id[:24]], env=env,
                             cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming with {len(kept)} candidates kept" in resumed.stderr
    assert f"{profile} changed since the run started; resuming with the profile as it was when the run started" in resumed.stderr
    after = RunStore(store_path()).get_run(run_id)
    assert after["status"] == "finished"
    keys = [pipeline_key(c["pipeline"]) for c in after["candidates"]]
    assert len(after["candidates"]) == 6 and len(set(keys)) == 6, keys
    for cid, record in kept.items():  # what was measured before the kill is kept as it was
        again = next(c for c in after["candidates"] if c["id"] == cid)
        assert again["pipeline"] == record["pipeline"] and again["model_sha256"] == record["model_sha256"]
        assert again["metrics"]["latency_ms"] == record["metrics"]["latency_ms"]
    # what was measured now is exactly the new candidates' models the cache did not have yet
    # (earlier tests of this session may have measured some of them: same device, same settings)
    # (the device measures each model with the run's real held-out sample attached: that copy's sha256)
    as_measured = _as_measured(started_with.search.seed)
    new_models = {as_measured(c["model_sha256"]) for c in ok(after["candidates"]) if c["id"] not in kept}
    assert _measured_models() - measured_before == new_models - measured_before
    assert {as_measured(c["model_sha256"]) for c in ok(list(kept.values()))} <= measured_before
    results = json.loads((Path(after["out_dir"]) / "results.json").read_text())
    assert results["status"] == "finished" and results["best"] and len(results["candidates"]) == 6
    assert results["profile"] == "resume-kill9" and results["profile_path"] == str(profile.resolve())
    assert (Path(after["out_dir"]) / "best.onnx").exists() and (Path(after["out_dir"]) / "report.html").exists()
    assert _ray_leftovers(ray_tmp, wait_s=5) == []
    shutil.rmtree(ray_tmp, ignore_errors=True)

    # a finished run cannot be resumed; the reason is one line and exit code 2
    assert main(["--resume", run_id]) == 2
    assert "already finished" in capsys.readouterr().err
