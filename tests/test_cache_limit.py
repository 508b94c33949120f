"""The cache folder's size limit: least-recently-used eviction on real files, and `orchestrate cache`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli.main import cli
from orchestrator.search.cache import AccuracyCache, StageCache, trim_caches
from orchestrator.state import cachelimit
from orchestrator.state.cachelimit import CacheLimitError, cache_limit, parse_size, trim

KB = 1024


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A state folder of this test's own; the cache folder is `home/cache`."""
    monkeypatch.setenv("EDGE_ORCHESTRATOR_HOME", str(tmp_path))
    monkeypatch.delenv(cachelimit.LIMIT_ENV, raising=False)
    monkeypatch.setattr(cachelimit._Estimate, "by_root", {})
    return tmp_path


def _age(path: Path, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    os.utime(path, (when, when))


def _entry(kind: str, name: str, size: int, seconds_ago: float, suffixes=(".json", ".onnx")) -> list[Path]:
    """Real files of one entry in the state folder's cache, last used `seconds_ago`."""
    folder = cachelimit.cache_root() / kind
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in suffixes:
        path = folder / f"{name}{suffix}"
        path.write_bytes(b"x" * (size // len(suffixes)))
        _age(path, seconds_ago)
        paths.append(path)
    return paths


def _stage(cache: StageCache, key: str, size: int, seconds_ago: float) -> None:
    cache.put(key, b"o" * size, {"step": "test"})
    for path in cache.folder.glob(f"{key}.*"):
        _age(path, seconds_ago)


# ------------------------------------------------------------------ the limit


@pytest.mark.parametrize("text, expected", [
    ("1048576", 1048576), ("500M", 500 * KB**2), ("2G", 2 * KB**3), ("1.5GiB", int(1.5 * KB**3)),
    ("64 kb", 64 * KB), ("10B", 10), (" 3T ", 3 * KB**4), ("off", None),
])
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "5X", "-1G", "1..5G", "G", "1 G B"])
def test_a_bad_size_is_one_clear_error(text, monkeypatch):
    monkeypatch.setenv(cachelimit.LIMIT_ENV, text or "??")
    with pytest.raises(CacheLimitError) as err:
        cache_limit()
    assert "$EDGE_ORCHESTRATOR_CACHE_MAX" in str(err.value) and "500M, 2G, 1.5GiB" in str(err.value)
    assert err.value.exit_code == 2


def test_the_default_limit_is_5_gib(monkeypatch):
    monkeypatch.delenv(cachelimit.LIMIT_ENV, raising=False)
    assert cache_limit() == 5 * KB**3


# ------------------------------------------------------------------ eviction


def test_an_entry_read_recently_survives_an_old_unread_one_goes(home):
    cache = StageCache()
    _stage(cache, "a", 10 * KB, 300)  # oldest written, but read below
    _stage(cache, "b", 10 * KB, 200)  # written after a, never read
    _stage(cache, "c", 10 * KB, 100)
    assert cache.get("a") is not None  # a hit: a is now the most recently used
    result = trim(25 * KB)
    assert result.removed == 1 and result.after <= 25 * KB
    left = sorted(p.name for p in cache.folder.iterdir())
    assert left == ["a.json", "a.onnx", "c.json", "c.onnx"]  # b went whole, its metadata with its model
    assert cache.get("a") is not None and cache.get("c") is not None and cache.get("b") is None


def test_accuracy_hits_count_as_use(home):
    acc = AccuracyCache()
    acc.put("m1", "task", 0, 0.9)
    acc.put("m2", "task", 0, 0.8)
    for path in acc.folder.iterdir():
        _age(path, 100)
    _age(acc._path("m1", "task", 0), 200)
    assert acc.get("m1", "task", 0) == 0.9
    size = acc._path("m2", "task", 0).stat().st_size
    trim(size + 5)
    assert acc.get("m1", "task", 0) == 0.9 and acc.get("m2", "task", 0) is None


def test_base_models_go_last_and_models_after_the_rebuildable_kinds(home):
    task = _entry("tasks", "digits-abc", 10 * KB, 90_000, (".json", ".pt"))  # the oldest of all
    model = _entry("models", "sha1", 10 * KB, 80_000, (".onnx",))
    stage = _entry("stages", "s1", 10 * KB, 10)  # the newest
    trim(25 * KB)
    assert all(p.exists() for p in task + model) and not any(p.exists() for p in stage)
    trim(15 * KB)
    assert all(p.exists() for p in task) and not any(p.exists() for p in model)
    trim(5 * KB)  # still over: the base model goes too
    assert not any(p.exists() for p in task)


def test_entries_in_use_are_left(home):
    busy = _entry("stages", "busy", 10 * KB, 500)
    tmp = busy[0].parent / ".busy.json.tmp4242"  # being written now (atomic_write's temporary name)
    tmp.write_bytes(b"x" * KB)
    fresh_model = _entry("models", "new", 10 * KB, 60, (".onnx",))  # a running run may still need it
    run_log = cachelimit.cache_root() / "tune" / "run-1"
    run_log.mkdir(parents=True)
    (run_log / "result.json").write_text("{}")  # a Ray Tune experiment still being written
    result = trim(1)
    assert result.removed == 0 and result.after > 1
    assert all(p.exists() for p in [*busy, tmp, *fresh_model, run_log])
    for path in (tmp, run_log / "result.json", run_log):
        _age(path, 2 * 86400)  # a crash's leftover, a finished experiment
    assert trim(12 * KB).removed >= 1 and not tmp.exists() and not run_log.exists()


def test_trimming_twice_at_once_and_files_vanishing_are_fine(home):
    for i in range(4):
        _entry("stages", f"k{i}", 4 * KB, 100 + i)
    entries = cachelimit.scan("stages")
    for entry in entries:  # another process removed them after this one looked
        assert cachelimit.remove(entry)
        assert cachelimit.remove(entry)
    assert cachelimit.scan("stages") == []
    _entry("stages", "k9", 4 * KB, 100)
    with cachelimit._trim_lock(cachelimit.cache_root(), wait=True):  # another process is trimming
        assert trim(1, wait=False).skipped
    assert trim(1).removed == 1


def test_a_put_trims_when_the_folder_is_more_than_10_percent_over(home, monkeypatch):
    monkeypatch.setenv(cachelimit.LIMIT_ENV, "40K")
    cache = StageCache()
    for i in range(12):
        _stage(cache, f"k{i:02}", 8 * KB, 1000 - i)  # each older than the next
        assert cachelimit.usage() <= 40 * KB * 1.1 + 8 * KB
    left = {p.stem for p in cache.folder.glob("*.json")}
    assert "k11" in left and "k00" not in left  # the newest kept, the oldest gone
    assert trim_caches().after <= 40 * KB


def test_a_bad_limit_never_fails_a_put(home, monkeypatch):
    monkeypatch.setenv(cachelimit.LIMIT_ENV, "lots")
    StageCache().put("k", b"model", {})
    assert StageCache().get("k") is not None
    with pytest.raises(CacheLimitError):
        trim_caches()


# ------------------------------------------------------------------ `orchestrate cache`


def test_cache_info_shows_kinds_total_limit_and_folder(home, monkeypatch):
    monkeypatch.setenv(cachelimit.LIMIT_ENV, "2G")
    _entry("stages", "s1", 2 * KB, 3600)
    _entry("tasks", "digits-abc", 4 * KB, 7200, (".json", ".pt"))
    result = CliRunner().invoke(cli, ["cache", "info"])
    assert result.exit_code == 0, result.output
    for word in ("stages", "accuracy", "tune", "models", "tasks", "limit 2.0 GiB", "total 6.0 KiB", "60 min ago", "2 h ago"):
        assert word in result.output
    assert "cache" in result.output and str(home.name) in result.output.replace("\n", "")
    data = json.loads(CliRunner().invoke(cli, ["cache", "info", "--json"]).output)
    assert data["limit_bytes"] == 2 * KB**3 and data["total_bytes"] == 6 * KB
    assert data["kinds"]["stages"]["entries"] == 1 and data["kinds"]["tasks"]["bytes"] == 4 * KB


def test_cache_clear_one_kind_or_all(home):
    stage = _entry("stages", "s1", 2 * KB, 10)
    task = _entry("tasks", "digits-abc", 2 * KB, 10, (".json", ".pt"))
    result = CliRunner().invoke(cli, ["cache", "clear", "--kind", "stages", "--yes"])
    assert result.exit_code == 0 and "removed 1 entries" in result.output
    assert not any(p.exists() for p in stage) and all(p.exists() for p in task)
    result = CliRunner().invoke(cli, ["cache", "clear", "--yes"])
    assert result.exit_code == 0 and not any(p.exists() for p in task)


def test_cache_clear_asks_on_a_terminal(home, monkeypatch):
    stage = _entry("stages", "s1", 2 * KB, 10)
    monkeypatch.setattr("orchestrator.cli.cache._interactive", lambda: True)
    result = CliRunner().invoke(cli, ["cache", "clear"], input="n\n")
    assert result.exit_code == 0 and "remove every" in result.output and "nothing removed" in result.output
    assert all(p.exists() for p in stage)
    result = CliRunner().invoke(cli, ["cache", "clear"], input="y\n")
    assert result.exit_code == 0 and not any(p.exists() for p in stage)


def test_cache_clear_refuses_an_unknown_kind_in_one_line(home):
    stage = _entry("stages", "s1", 2 * KB, 10)
    result = CliRunner().invoke(cli, ["cache", "clear", "--kind", "bogus", "--yes"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: unknown cache kind 'bogus': the kinds are stages, accuracy, tune, models, tasks"]
    assert all(p.exists() for p in stage)


def test_orchestrate_cache_info_runs_as_a_command(home):
    _entry("models", "sha1", 3 * KB, 60, (".onnx",))
    env = {**os.environ, "EDGE_ORCHESTRATOR_HOME": str(home), "COLUMNS": "200"}
    bin_dir = Path(sys.executable).parent
    done = subprocess.run([str(bin_dir / "orchestrate"), "cache", "info"], check=False, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "models" in done.stdout and "total 3.0 KiB" in done.stdout and "limit 5.0 GiB" in done.stdout
    env[cachelimit.LIMIT_ENV] = "much"
    done = subprocess.run([str(bin_dir / "orchestrate"), "cache", "info"], check=False, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "EDGE_ORCHESTRATOR_CACHE_MAX='much' is not a size" in done.stderr
