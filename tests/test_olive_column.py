"""bench/own_models.py's Olive column where olive-ai cannot be imported (as in CI, which never installs it): the
column says so, and asking for it is refused in one line. Olive itself is not run here (minutes per model)."""

import sys

import pytest

from bench import olive_column, own_models


@pytest.fixture
def no_olive(monkeypatch):
    """`import olive` fails, as where olive-ai is not installed."""
    monkeypatch.setitem(sys.modules, "olive", None)


def test_without_olive_the_column_says_not_installed(no_olive):
    assert olive_column.olive_version() is None
    assert olive_column.cell({"olive": {"missing": olive_column.NOT_INSTALLED}}) == "olive-ai not installed | - |"
    assert olive_column.cell({}) == "not measured | - |"  # a row kept from a run before the column


def test_asking_for_olive_without_it_is_one_line(no_olive, capsys):
    with pytest.raises(SystemExit) as exc:
        own_models.main(["--olive", "--only", "ocr-cls"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--olive: olive-ai not installed (pip install 'edge-orchestrator[bench-olive]')")


def test_pick_against_olive_keeping_fp32():
    """Olive gave no model faster than fp32 within the limit: its best is fp32, timed in the same rounds."""
    figures = {"fp32_rounds_ms": [10.0, 11.0, 12.0], "pick_rounds_ms": [5.0, 5.0, 6.0], "extra_rounds_ms": []}
    report = {"version": "0.13.0", "budget": 0, "models": [],
              "workflows": {"int8": {"tried": 60, "failed": 24, "met_goals": 0, "best": None}}}
    out = olive_column.summary(report, figures, 1000)
    assert out["taken"].startswith("fp32") and out["smaller"] == 1.0
    assert out["pick_vs_olive"] == pytest.approx(11.0 / 5.0) and out["target_met"]
    assert "int8: 60 evaluated, 24 failed, 0 met the goals" in olive_column.cell({"olive": out})
