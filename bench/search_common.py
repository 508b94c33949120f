"""What bench/scaling.py, bench/search_efficiency.py and bench/overhead.py share.

Each of them drives whole searches through `orchestrator.run.execute_run`, the code path of
`orchestrate --profile`, with a variant of the x86-host profile, and times them from the
outside (the driver's clock when each candidate arrives) and from the inside (each stored
candidate's `timing`). State goes to a private folder, `.state/bench/search-home`, unless
$EDGE_ORCHESTRATOR_HOME says otherwise, so no user state is touched and the caches that a
benchmark builds on purpose (search_efficiency's grid) are kept for its next run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
X86 = ROOT / "device_profiles" / "x86-host.yaml"


def private_home() -> Path:
    """Point $EDGE_ORCHESTRATOR_HOME at the benchmarks' own state folder (unless it is set), and return it.

    The digits base model (about 1.5 minutes to train on 2 cores) is copied in from the user's
    or another benchmark's state folder when one has it: it is keyed by task and seed, so a copy
    is the very model this folder would train.
    """
    if not os.environ.get("EDGE_ORCHESTRATOR_HOME"):
        os.environ["EDGE_ORCHESTRATOR_HOME"] = str(ROOT / ".state" / "bench" / "search-home")
    home = Path(os.environ["EDGE_ORCHESTRATOR_HOME"])
    tasks = home / "cache" / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    xdg = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "edge-orchestrator"
    for source in (ROOT / ".state" / "bench" / "cache" / "tasks", xdg / "cache" / "tasks"):
        if source.is_dir() and source.resolve() != tasks.resolve():
            for path in source.glob("digits-*"):
                if not (tasks / path.name).exists():
                    shutil.copy2(path, tasks / path.name)
    return home


def machine() -> dict[str, Any]:
    """This machine as the results describe it: cores, CPU model, load average now, library versions."""
    import onnxruntime
    import ray
    import torch

    from agents.info import cpu_model

    return {"cores": os.cpu_count(), "cpu": cpu_model() or platform.processor(), "arch": platform.machine(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "ray": ray.__version__}


def caption(result: dict[str, Any]) -> str:
    """The first line of a benchmark's figures: when, where, how loaded; a quick run and a busy machine say so."""
    m = result["machine"]
    quick = ", QUICK (smoke) run" if result.get("quick") else ""
    return (f"Measured {result['date']} on {m['cpu']}, {m['cores']} cores, load average at the start "
            f"{m['load_average_at_start'][0]:.2f}{quick}.{busy_note(result)}")


def busy_note(result: dict[str, Any]) -> str:
    """A warning line when other work loaded the machine, else ''.

    The load at the start is other work's; at the end it includes the benchmark's own (it keeps
    every core busy), so only an end load above the cores counts as someone else's.
    """
    cores = result["machine"]["cores"] or 1
    start = result["machine"]["load_average_at_start"][0]
    end = (result.get("load_average_at_end") or [0.0])[0]
    if start <= 0.5 * cores and end <= cores + 0.5:
        return ""
    return (f"\nWARNING: the machine was busy (load average {start:.1f} at the start, {end:.1f} at the end, "
            f"{cores} cores): other work shared the CPUs, so these figures are not representative.")


def write_result(name: str, result: dict[str, Any], out: Path | None = None) -> Path:
    """Write `result` (date and machine first) to bench/results/<name>.json, or `out`."""
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def update_doc(name: str, text: str, doc: Path = ROOT / "docs" / "scaling.md") -> bool:
    """Put `text` between the `<!-- bench/<name>.py: begin -->` and `end` markers of `doc`; False if absent."""
    begin, end = f"<!-- bench/{name}.py: begin -->", f"<!-- bench/{name}.py: end -->"
    if not doc.exists():
        return False
    head, found, rest = doc.read_text().partition(begin)
    _, found_end, tail = rest.partition(end)
    if not (found and found_end):
        return False
    doc.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
    return True


def now() -> str:
    """UTC time, to the second, for the results."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def profile_variant(folder: Path, name: str, search: dict[str, Any] | None = None,
                    measurement: dict[str, Any] | None = None, **sections: Any) -> Any:
    """The x86-host profile with `search` / `measurement` keys (and whole sections) replaced, loaded.

    Written to `folder/<name>.yaml` and loaded with `load_profile`, like a user's profile.
    """
    import yaml

    from orchestrator.config.profile import load_profile

    data = yaml.safe_load(X86.read_text())
    data["name"] = name
    data["search"].update(search or {})
    if "int8-static" in data["search"].get("techniques", []) and "params" not in (search or {}):
        # the spaces these benchmarks document were measured before int8-static's format (QDQ or
        # QOperator) became searchable: QDQ keeps them the same size and comparable
        data["search"]["params"] = {"int8-static": {"quant_format": "QDQ"}}
    data["measurement"].update(measurement or {})
    data.update(sections)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_profile(path)


def space_size(loaded: Any) -> int:
    """How many candidates the profile's search space holds (baseline included)."""
    from orchestrator.hooks.manager import get_plugin_manager
    from orchestrator.search.space import allowed_techniques, enumerate_candidates

    techniques = allowed_techniques(loaded, get_plugin_manager())
    return len(enumerate_candidates(techniques, loaded.profile.search.max_pipeline_length))


@dataclass
class TimedRun:
    """One execute_run, timed: wall clock from outside, each candidate's arrival, the stored records."""

    status: str
    wall_s: float  # the whole execute_run: Ray start and stop, base model, search, selection, report
    search_started: float  # time.perf_counter() when the base model was ready (the search, Ray start first)
    arrivals: list[float]  # time.perf_counter() when the driver stored each candidate, in order
    records: list[dict[str, Any]]
    results: dict[str, Any]
    error: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> list[dict[str, Any]]:
        """The candidates that were built and measured."""
        return [r for r in self.records if r.get("status") == "ok"]

    def errors(self) -> list[str]:
        """The distinct errors of the candidates that failed (a benchmark of failures measures nothing)."""
        return sorted({str(r.get("error")) for r in self.records if r.get("status") == "failed"})

    def window_s(self) -> float:
        """From the start of the first trial to the arrival of the last candidate.

        A trial's start is its arrival minus its own `trial_s`, so the window leaves out Ray's
        start, the first worker's launch and everything after the search (selection, report),
        but holds every gap the scheduler leaves between trials.
        """
        starts = [t - (r.get("timing") or {}).get("trial_s", 0.0) for t, r in zip(self.arrivals, self.records)]
        return max(self.arrivals) - min(starts)

    def per_minute(self) -> float:
        """Candidates (ok ones) per minute of the search window."""
        return 60.0 * len(self.ok) / self.window_s()


def timed_run(loaded: Any, **options: Any) -> TimedRun:
    """execute_run with RunOptions(**options), its run folder in a temporary place (removed afterwards)."""
    from orchestrator.hooks.manager import get_plugin_manager
    from orchestrator.run import RunOptions, execute_run

    marks: dict[str, float] = {}
    arrivals: list[float] = []
    ids: list[str] = []

    from orchestrator import hookimpl

    class Clock:
        """An event plugin: when the search started, when each candidate arrived."""

        @hookimpl
        def base_model_ready(self) -> None:
            marks["search"] = time.perf_counter()

        @hookimpl
        def candidate_measured(self, candidate: dict[str, Any]) -> None:
            arrivals.append(time.perf_counter())
            ids.append(candidate["id"])

    registry = get_plugin_manager()
    registry.add_plugin(Clock(), "bench-clock")
    with tempfile.TemporaryDirectory(prefix="eo-bench-runs-") as tmp:
        started = time.perf_counter()
        outcome = execute_run(loaded, registry, RunOptions(out_dir=Path(tmp), **options))
        wall = time.perf_counter() - started
    by_id = {r["id"]: r for r in outcome.candidates}
    records = [by_id[i] for i in ids]  # arrival order (ids are given in that order too)
    return TimedRun(outcome.status, wall, marks.get("search", started), arrivals, records, outcome.results,
                    str(outcome.error) if outcome.error else None)


def work_s(record: dict[str, Any]) -> float:
    """A trial's compression, evaluation and measurement seconds (measurement includes waiting for a device)."""
    timing = record.get("timing") or {}
    return sum(timing.get(k, 0.0) for k in ("build_s", "evaluate_s", "measure_s"))


def median(values: list[float]) -> float:
    """statistics.median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def check(ok: bool) -> str:
    """'met' or 'NOT met', for a verdict line."""
    return "met" if ok else "NOT met"


def finish(name: str, result: dict[str, Any], table: Callable[[dict[str, Any]], str], out: Path | None,
           docs: bool) -> int:
    """A benchmark's end: the load average now, bench/results/<name>.json, the table, its block in docs/scaling.md."""
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = write_result(name, result, out)
    print(table(result))
    print(f"\nwrote {path}")
    if docs and update_doc(name, table(result)):
        print("and the figures in docs/scaling.md")
    return 0


def interleaved_rounds(models: list[bytes], profile: Any, rounds: int) -> dict[str, Any]:
    """`models` measured together by one local agent process (the last core pinned), `rounds`
    interleaved rounds of the profile's protocol (the final round's); the agent's JSON, or SystemExit."""
    from orchestrator.devices.local import LocalTransport, local_device

    protocol = profile.model_copy(deep=True)
    protocol.measurement.final_rounds = rounds
    protocol.measurement.final_time_budget_s = 600.0
    device = local_device()
    device.pinned_cpu = (os.cpu_count() or 1) - 1 if (os.cpu_count() or 1) > 1 else None
    result = LocalTransport(device).compare(models, protocol)
    if "error" in result:
        raise SystemExit(f"measuring {len(models)} models side by side failed: {result['error']}")
    return result
