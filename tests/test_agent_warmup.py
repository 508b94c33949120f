"""Warm-up until the latency is stable: the rule on a fake clock, then the agent's bench end to end."""


from __future__ import annotations



from agents.benchmark import warm_up
from tests.helpers.agent import run_main, tiny_cnn


# ------------------------------------------------------------------------------- warm-up until stable


class FakeClock:
    """A nanosecond clock that only moves when a scripted run() moves it."""

    def __init__(self, run_ms):
        self.now, self.run_ms, self.calls = 0, list(run_ms), 0

    def __call__(self):
        return self.now

    def run(self):
        self.now += int(self.run_ms[min(self.calls, len(self.run_ms) - 1)] * 1e6)
        self.calls += 1


NOISY_THEN_STEADY = [5.0, 10.0] * 8 + [1.0] * 100  # 16 unsteady runs (cold caches), then steady


def test_warm_up_until_stable_stops_once_the_last_window_is_steady():
    clock = FakeClock(NOISY_THEN_STEADY)
    result = warm_up(clock.run, 5, 60.0, until_stable=True, max_runs=1000, window=10, max_cv=0.05, clock=clock)
    assert result.ended == "stable" and result.stable is True
    assert len(result.samples) == 16 + 10  # the first window made only of steady runs
    assert result.samples[-1] == 1.0


def test_warm_up_fixed_count_reports_whether_it_was_stable():
    clock = FakeClock(NOISY_THEN_STEADY)
    result = warm_up(clock.run, 12, 60.0, clock=clock)
    assert result.ended == "count" and len(result.samples) == 12 and result.stable is False
    clock = FakeClock([1.0])
    assert warm_up(clock.run, 3, 60.0, clock=clock).stable is None  # fewer runs than a window


def test_warm_up_until_stable_gives_up_at_max_runs_or_the_time_budget():
    clock = FakeClock([5.0, 10.0] * 50)
    result = warm_up(clock.run, 5, 60.0, until_stable=True, max_runs=40, window=10, max_cv=0.05, clock=clock)
    assert result.ended == "max-runs" and len(result.samples) == 40 and result.stable is False
    clock = FakeClock([1000.0])  # 1 s per run, 3 s budget
    result = warm_up(clock.run, 1, 3.0, until_stable=True, max_runs=1000, window=10, max_cv=0.05, clock=clock)
    assert result.ended == "time-budget" and len(result.samples) == 3 and result.stable is None


def test_bench_warmup_until_stable_end_to_end(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_AGENT_SYSFS_ROOT", str(tmp_path))  # no sensors: the bench only
    model = tiny_cnn(tmp_path / "tiny.onnx")
    code, out, _ = run_main(capsys, "bench", "--model", str(model), "--runs", "5", "--warmup", "3")
    assert code == 0 and out["warmup_runs"] == 3 and out["warmup_ended"] == "count"
    assert out["warmup_stable"] is None  # 3 runs are fewer than a 10-run window
    # any CV is under 10: stable as soon as there is a full window of 5 runs
    code, out, _ = run_main(capsys, "bench", "--model", str(model), "--runs", "5", "--warmup", "3",
                            "--warmup-until-stable", "--stable-window", "5", "--stable-cv", "10")
    assert code == 0 and out["warmup_runs"] == 5
    assert out["warmup_ended"] == "stable" and out["warmup_stable"] is True
    # a CV no real latencies reach: warm-up goes on to --warmup-max and says so
    code, out, _ = run_main(capsys, "bench", "--model", str(model), "--runs", "5", "--warmup", "3",
                            "--warmup-until-stable", "--warmup-max", "30", "--stable-cv", "1e-9")
    assert code == 0 and out["warmup_runs"] == 30 and out["warmup_ended"] == "max-runs"
    assert out["warmup_stable"] is False
    assert any("warm-up did not become stable" in w for w in out["warnings"])
    code, out, _ = run_main(capsys, "bench", "--model", str(model), "--stable-window", "1")
    assert code == 2 and "--stable-window" in out["error"]
