"""The agent's install on the device: every file and folder fsynced before `current` switches, and `current`
verified (sha256) when chosen, with a fallback from a broken one."""


from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from agents.cli import main
from agents.kernel import reference_inputs
from tests.helpers.agent import run_main, tiny_cnn


# ------------------------------------------------------------- install: durable, and `current` verified


def _upload(root: Path, model: Path, tag: str) -> list[str]:
    """What the host uploads (the model, and reference inputs/outputs), put into the device's incoming
    folder; returns install's arguments."""
    import io

    import onnxruntime as ort

    incoming = root / "deploy" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = reference_inputs(session)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    buf = io.BytesIO()
    np.savez(buf, **{"inputs/" + k: v for k, v in feeds.items()}, **{"outputs/" + k: v for k, v in outputs.items()})
    (incoming / ("m-" + tag)).write_bytes(model.read_bytes())
    (incoming / ("r-" + tag)).write_bytes(buf.getvalue())
    return ["install", "--root", str(root), "--model", str(incoming / ("m-" + tag)),
            "--sha256", hashlib.sha256(model.read_bytes()).hexdigest(), "--reference", str(incoming / ("r-" + tag)),
            "--reference-sha256", hashlib.sha256(buf.getvalue()).hexdigest()]


def _two_versions(tmp_path: Path, capsys) -> tuple[Path, str, str]:
    """A device folder with version A installed, then B (current)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "device"
    shas = []
    for tag, batch in (("a", "N"), ("b", 2)):
        model = tiny_cnn(tmp_path / ("%s.onnx" % tag), batch=batch)
        code, out, _ = run_main(capsys, *_upload(root, model, tag))
        assert code == 0, out
        shas.append(out["version"])
    return root, shas[0], shas[1]


def _truncate(path: Path) -> None:
    """What a power cut before the data reached the disk leaves: the file's name, not all of its bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fsynced files through /proc/self/fd")
def test_install_fsyncs_every_file_and_folder_before_switching_current(tmp_path, capsys, monkeypatch):
    root = tmp_path / "device"
    args = _upload(root, tiny_cnn(tmp_path / "m.onnx"), "x")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink("/proc/self/fd/%d" % fd)))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", os.fspath(dst)))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    code, out, _ = run_main(capsys, *args)
    assert code == 0, out
    deploy = str(root / "deploy")
    switch = events.index(("replace", deploy + "/current"))
    before = [path for kind, path in events[:switch] if kind == "fsync"]
    tmp = next(p for p in before if os.path.dirname(p) == deploy + "/versions" and "/.tmp-" in p)  # the new folder
    for name in ("model.onnx", "reference.npz", "manifest.json"):
        assert tmp + "/" + name in before, (name, before)
    folder_synced = len(before) - 1 - before[::-1].index(tmp)  # after the last file in it
    assert folder_synced > max(before.index(tmp + "/" + n) for n in ("model.onnx", "reference.npz", "manifest.json"))
    assert deploy + "/versions" in before[folder_synced:]  # then the rename of the folder into place
    assert deploy + "/state.json" in [os.path.join(os.path.dirname(p), "state.json") for p in before]
    assert ("fsync", deploy) in events[switch:]  # and the switch itself
    assert (root / "deploy" / "current").resolve().name == out["version"]


def test_a_model_truncated_after_install_is_not_accepted_as_current(tmp_path, capsys):
    from agents.versions import Layout

    root, a, b = _two_versions(tmp_path, capsys)
    layout = Layout(str(root))
    assert layout.current_version() == b
    _truncate(root / "deploy" / "versions" / b / "model.onnx")
    assert layout.current_version() is None and layout.linked_version() == b

    code, out, _ = run_main(capsys, "status", "--root", str(root))  # start-up: falls back and says so
    assert code == 0 and out["current"]["version"] == a and out["previous"] is None
    assert out["fallback"]["version"] == b and out["fallback"]["fell_back_to"] == a
    assert "does not match the sha256 in its manifest" in out["fallback"]["problem"]
    assert os.readlink(root / "deploy" / "current") == os.path.join("versions", a)
    assert json.loads((root / "deploy" / "state.json").read_text())["history"] == [a]
    code, out, _ = run_main(capsys, "status", "--root", str(root))
    assert code == 0 and out["current"]["version"] == a and "fallback" not in out  # repaired once

    code, health, _ = run_main(capsys, "health", "--root", str(root))
    assert code == 0 and health["version"] == a and health["healthy"] is True
    # the host installs B again: the broken folder is replaced, B is current and intact, A its previous
    code, out, _ = run_main(capsys, *_upload(root, tmp_path / "b.onnx", "b2"))
    assert code == 0 and out["version"] == b and out["previous"] == a and out["reused"] is False
    assert layout.current_version() == b


def test_install_and_watch_fall_back_from_a_broken_current(tmp_path, capsys):
    root, a, b = _two_versions(tmp_path, capsys)
    _truncate(root / "deploy" / "versions" / b / "model.onnx")
    assert main(["watch", "--root", str(root), "--count", "1", "--interval", "1"]) == 0
    line, final = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert line["fallback"]["version"] == b and line["fallback"]["fell_back_to"] == a
    assert line["check"]["version"] == a and line["check"]["healthy"] is True and final["current"] == a

    root, a, b = _two_versions(tmp_path / "again", capsys)
    _truncate(root / "deploy" / "versions" / b / "model.onnx")
    code, out, _ = run_main(capsys, *_upload(root, tiny_cnn(tmp_path / "c.onnx", batch=3), "c"))
    assert code == 0 and out["previous"] == a  # not the broken B: a rollback must not go back to it
    assert out["fallback"]["version"] == b and out["fallback"]["fell_back_to"] == a


def test_a_broken_current_with_nothing_to_fall_back_to_is_reported(tmp_path, capsys):
    root = tmp_path / "device"
    model = tiny_cnn(tmp_path / "m.onnx")
    code, out, _ = run_main(capsys, *_upload(root, model, "x"))
    sha = out["version"]
    _truncate(root / "deploy" / "versions" / sha / "model.onnx")
    code, out, _ = run_main(capsys, "status", "--root", str(root))
    assert code == 0 and out["current"] is None
    assert out["fallback"] == {"version": sha, "problem": out["fallback"]["problem"], "fell_back_to": None}
    assert out["fallback"]["problem"].startswith("version %s... is not intact: its model.onnx (" % sha[:12])
    code, health, _ = run_main(capsys, "health", "--root", str(root))
    assert code == 0 and health["healthy"] is False and "no longer matches its sha256" in health["reasons"][0]
    code, out, _ = run_main(capsys, *_upload(root, model, "y"))  # the host installs it again: intact
    assert code == 0 and out["previous"] is None and out["reused"] is False
    code, out, _ = run_main(capsys, "status", "--root", str(root))
    assert out["current"]["version"] == sha and "fallback" not in out
