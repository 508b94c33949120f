"""Device profiles: the shipped ones load, and a bad one is reported as `FILE:LINE: field.path: message`.

Broken profiles are made from the text of device_profiles/x86-host.yaml, edited line by line;
every expected LINE is computed from the text actually written, never hard-coded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.profile import OBJECTIVE_METRICS, load_profile
from orchestrator.errors import ExitCode, ProfileError

PROFILES_DIR = Path(__file__).resolve().parents[1] / "device_profiles"
PROFILE_FILES = sorted(PROFILES_DIR.glob("*.yaml"))
X86 = PROFILES_DIR / "x86-host.yaml"


# --- helpers ------------------------------------------------------------------------------------


def _lines() -> list[str]:
    """The x86-host profile, one string per line, line endings kept."""
    return X86.read_text(encoding="utf-8").splitlines(keepends=True)


def _index(lines: list[str], section: str, key: str | None = None) -> int:
    """0-based index of top-level `section:`, or of `  key:` inside that section."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{section}:"))
    if key is None:
        return start
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if line[:1] not in ("", " ", "#", "\n"):  # next top-level key: section is over
            break
        if line.startswith(f"  {key}:"):
            return i
    raise AssertionError(f"{section}.{key} not found in {X86}")


def _write(tmp_path: Path, lines: list[str] | str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(lines if isinstance(lines, str) else "".join(lines), encoding="utf-8")
    return path


def _error(path: Path) -> ProfileError:
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    return info.value


# --- the shipped profiles -----------------------------------------------------------------------


def test_expected_profiles_are_shipped():
    names = {p.stem for p in PROFILE_FILES}
    assert {"x86-host", "rpi4", "rpi5", "jetson", "jetson-nano"} <= names


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.name)
def test_shipped_profile_loads(path: Path):
    loaded = load_profile(path)
    profile = loaded.profile
    assert profile.name == path.stem
    assert loaded.path == path
    natural = "minimize" if OBJECTIVE_METRICS[profile.objective.metric] == "min" else "maximize"
    assert profile.objective.goal == natural
    assert profile.power.active_watts >= profile.power.idle_watts
    assert profile.power.source.strip()
    assert profile.search.techniques, "a profile that allows no technique can only keep the baseline"
    if profile.emulation is not None:
        # QEMU stands in for the board: same number of cores, same memory.
        assert profile.emulation.cores == profile.hardware.cores
        assert profile.emulation.memory_mb == profile.hardware.memory_mb


def test_x86_host_is_a_fast_demo():
    profile = load_profile(X86).profile
    assert profile.hardware.arch == "x86_64"
    assert profile.emulation is None
    assert profile.runtime.execution_providers == ["CPUExecutionProvider"]
    assert profile.runtime.intra_op_threads == 1
    assert profile.search.trials <= 16  # the demo must stay within a few minutes
    assert (profile.measurement.warmup_runs, profile.measurement.runs) == (20, 200)
    assert profile.measurement.time_budget_s == 5
    assert profile.fallback_device == "local"


def test_line_of_points_at_the_field():
    loaded = load_profile(X86)
    lines = _lines()
    assert loaded.line_of(("constraints", "max_latency_ms")) == _index(lines, "constraints", "max_latency_ms") + 1
    assert loaded.line_of(("search", "trials")) == _index(lines, "search", "trials") + 1
    # a field that is not in the file: its nearest parent that is
    assert loaded.line_of(("constraints", "max_energy_mj")) == _index(lines, "constraints") + 1
    err = loaded.error(("search", "trials"), "too many")
    assert str(err) == f"{X86}:{_index(lines, 'search', 'trials') + 1}: search.trials: too many"


# --- schema errors: FILE:LINE: field.path: message ----------------------------------------------


def test_unknown_field(tmp_path: Path):
    lines = _lines()
    at = _index(lines, "constraints") + 1
    lines.insert(at, "  max_latency: 5\n")
    path = _write(tmp_path, lines)
    err = _error(path)
    assert str(err) == f"{path}:{at + 1}: constraints.max_latency: unknown field"
    assert ProfileError.exit_code == 2
    assert err.exit_code == ExitCode.USAGE == 2


def test_unknown_top_level_field(tmp_path: Path):
    lines = _lines()
    lines.append("colour: blue\n")
    path = _write(tmp_path, lines)
    assert str(_error(path)) == f"{path}:{len(lines)}: colour: unknown field"


def test_wrong_type(tmp_path: Path):
    lines = _lines()
    at = _index(lines, "hardware", "cores")
    lines[at] = '  cores: "four"\n'
    path = _write(tmp_path, lines)
    message = str(_error(path))
    assert message.startswith(f"{path}:{at + 1}: hardware.cores: ")
    assert "integer" in message


def test_missing_required_field(tmp_path: Path):
    lines = _lines()
    start = _index(lines, "objective")
    end = start + 1
    while end < len(lines) and lines[end].startswith(" "):
        end += 1
    del lines[start:end]
    assert not any(line.startswith("objective:") for line in lines)
    path = _write(tmp_path, lines)
    message = str(_error(path))
    assert message.startswith(f"{path}:")
    assert "objective: field required" in message


def test_empty_list_reports_its_line(tmp_path: Path):
    lines = _lines()
    at = _index(lines, "runtime", "execution_providers")
    lines[at] = "  execution_providers: []\n"
    path = _write(tmp_path, lines)
    assert str(_error(path)).startswith(f"{path}:{at + 1}: runtime.execution_providers: ")


def test_list_item_reports_its_own_line(tmp_path: Path):
    lines = _lines()
    at = _index(lines, "runtime", "execution_providers")
    lines[at : at + 1] = [
        "  execution_providers:\n",
        "    - CPUExecutionProvider\n",
        "    - [not, a, string]\n",
    ]
    path = _write(tmp_path, lines)
    assert str(_error(path)).startswith(f"{path}:{at + 3}: runtime.execution_providers[1]: ")


def test_several_errors_report_the_first_and_count_the_rest(tmp_path: Path):
    lines = _lines()
    at = _index(lines, "hardware", "cores")
    lines[at] = "  cores: 0\n"
    at_mem = _index(lines, "hardware", "memory_mb")
    lines[at_mem] = "  memory_mb: -1\n"
    path = _write(tmp_path, lines)
    message = str(_error(path))
    assert message.startswith(f"{path}:{at + 1}: hardware.cores: ")
    assert message.endswith(" (and 1 more error)")


# --- YAML that does not parse -------------------------------------------------------------------


def test_unbalanced_bracket(tmp_path: Path):
    lines = _lines()
    at = _index(lines, "runtime", "execution_providers")
    lines[at] = "  execution_providers: [CPUExecutionProvider]]\n"
    path = _write(tmp_path, lines)
    assert str(_error(path)).startswith(f"{path}:{at + 1}: (YAML): ")


def test_bad_indentation(tmp_path: Path):
    lines = _lines()
    at = _index(lines, "hardware", "cpu")
    lines[at] = " cpu: x86-64\n"  # one space: neither inside `hardware:` nor at the top level
    path = _write(tmp_path, lines)
    assert str(_error(path)).startswith(f"{path}:{at + 1}: (YAML): ")


def test_tab_indentation(tmp_path: Path):
    lines = _lines()
    at = _index(lines, "hardware", "cpu")
    lines[at] = "\tcpu: x86-64\n"
    path = _write(tmp_path, lines)
    message = str(_error(path))
    assert message.startswith(f"{path}:{at + 1}: (YAML): ")
    assert "\\t" in message


def test_control_character_reports_its_line(tmp_path: Path):
    lines = _lines()
    at = _index(lines, "hardware", "cpu")
    lines[at] = "  cpu: x86\x07\n"
    path = _write(tmp_path, lines)
    assert str(_error(path)).startswith(f"{path}:{at + 1}: (YAML): ")


def test_duplicate_key_reports_the_line_of_the_second_one(tmp_path: Path):
    lines = _lines()
    first = _index(lines, "hardware", "cores")
    at = _index(lines, "hardware", "memory_mb") + 1
    lines.insert(at, '  cores: "four"\n')  # hardware.cores again: refused, whatever its value
    path = _write(tmp_path, lines)
    assert str(_error(path)) == f"{path}:{at + 1}: hardware.cores: duplicate key (first on line {first + 1})"


# --- files that are not profiles ----------------------------------------------------------------


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.yaml"
    err = _error(path)
    assert str(err) == f"{path}: profile not found"
    assert err.exit_code == 2


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- x86-host\n- rpi4\n", "list"), ("just a string\n", "str"), ("42\n", "int")],
)
def test_top_level_not_a_mapping(tmp_path: Path, text: str, kind: str):
    path = _write(tmp_path, text)
    assert str(_error(path)) == f"{path}:1: (top level): a profile is a YAML mapping, got {kind}"


def test_empty_file(tmp_path: Path):
    path = _write(tmp_path, "# nothing but a comment\n")
    message = str(_error(path))
    assert message == f"{path}:1: (top level): the profile is empty"


# --- cross-field checks -------------------------------------------------------------------------


def _with_objective(tmp_path: Path, *body: str) -> tuple[Path, int]:
    lines = _lines()
    start = _index(lines, "objective")
    end = start + 1
    while end < len(lines) and lines[end].startswith(" "):
        end += 1
    lines[start:end] = ["objective:\n", *(f"  {line}\n" for line in body)]
    return _write(tmp_path, lines), start + 1


def test_objective_goal_conflicting_with_metric_is_refused(tmp_path: Path):
    path, line = _with_objective(tmp_path, "metric: accuracy", "goal: minimize")
    message = str(_error(path))
    assert message.startswith(f"{path}:{line}: objective: ")
    assert "accuracy can only be maximized" in message


def test_objective_minimize_metric_cannot_be_maximized(tmp_path: Path):
    path, line = _with_objective(tmp_path, "metric: latency_p90", "goal: maximize")
    message = str(_error(path))
    assert message.startswith(f"{path}:{line}: objective: ")
    assert "latency_p90 can only be minimized" in message


@pytest.mark.parametrize("goal", [None, "maximize"])
def test_objective_goal_defaults_to_and_accepts_the_natural_one(tmp_path: Path, goal: str | None):
    body = ["metric: accuracy"] + ([f"goal: {goal}"] if goal else [])
    path, _ = _with_objective(tmp_path, *body)
    assert load_profile(path).profile.objective.goal == "maximize"


def test_unknown_objective_metric(tmp_path: Path):
    path, line = _with_objective(tmp_path, "metric: throughput")
    assert str(_error(path)).startswith(f"{path}:{line + 1}: objective.metric: ")


def _with_power(tmp_path: Path, idle: float, active: float) -> tuple[Path, int]:
    lines = _lines()
    lines[_index(lines, "power", "idle_watts")] = f"  idle_watts: {idle}\n"
    lines[_index(lines, "power", "active_watts")] = f"  active_watts: {active}\n"
    return _write(tmp_path, lines), _index(lines, "power") + 1


def test_power_active_below_idle_is_refused(tmp_path: Path):
    path, line = _with_power(tmp_path, idle=10, active=5)
    message = str(_error(path))
    assert message.startswith(f"{path}:{line}: power: ")
    assert "active_watts must be at least idle_watts" in message


def test_power_active_equal_to_idle_is_allowed(tmp_path: Path):
    path, _ = _with_power(tmp_path, idle=3.5, active=3.5)
    assert load_profile(path).profile.power.active_watts == 3.5


def test_a_profile_from_stored_text_is_the_file_it_was_read_from(tmp_path: Path):
    """A resumed run reads the profile text the store kept: same profile, same errors, same folder."""
    import onnx
    from onnx import TensorProto, helper

    from orchestrator.config.profile import profile_from_text
    from orchestrator.hooks.manager import get_plugin_manager
    from orchestrator.models.tasks import resolve_task

    text = X86.read_text(encoding="utf-8") + "model:\n  source: model.onnx\n"
    gone = tmp_path / "moved" / "x86.yaml"
    loaded = profile_from_text(text, gone)
    assert loaded.profile == load_profile(_write(tmp_path, text)).profile and loaded.path == gone
    (gone.parent).mkdir()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    onnx.save(helper.make_model(graph), gone.parent / "model.onnx")
    task = resolve_task(loaded, get_plugin_manager())  # a relative model path: from the profile's own folder
    assert Path(task.source) == gone.parent / "model.onnx"
    lines = _lines()
    i = _index(lines, "search", "trials")
    lines[i] = "  trials: many\n"
    with pytest.raises(ProfileError) as info:
        profile_from_text("".join(lines), gone)
    assert str(info.value).startswith(f"{gone}:{i + 1}: search.trials: ")
