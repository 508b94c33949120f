"""On-device rollout commands: ``install``, ``health``, ``rollback``, ``status``, ``watch`` (docs/rollout.md).

DEPENDENCY NOTE: like every agent module (see agents/kernel.py), this runs on the edge device with
only Python 3.9+, numpy and onnxruntime. Import ONLY the standard library, numpy, onnxruntime and
agents.*; keep the syntax Python 3.9 compatible; spawn no subprocess. The folder layout, why an
install is atomic and durable, and the check that `current` is intact: agents/versions.py.

Imports: deploy -> health -> versions -> kernel (and deploy -> versions, kernel); nothing imports back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
import uuid

from agents.health import cmd_health, cmd_watch, load_reference
from agents.kernel import AgentError, ExitCode, bounded, create_session, file_sha256, one_line
from agents.versions import (
    MANIFEST,
    MODEL,
    REFERENCE,
    Layout,
    check_version,
    checked_current,
    clean_leftovers,
    fsync_dir,
    fsync_file,
    inside,
    load_history,
    locked,
    prune,
    read_json,
    repair_current,
    save_history,
    summary,
    switch_current,
    version_problem,
    write_atomic,
)

MAX_META_BYTES = 64 * 1024
COMMANDS_HELP = "install,health,rollback,status,watch"


def _check_upload(path: str, expected: str, what: str) -> None:
    got = file_sha256(path)
    if got != expected:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise AgentError("corrupt upload refused: %s has sha256 %s..., expected %s...; it was removed"
                         % (what, got[:16], expected[:16]), ExitCode.MODEL_INVALID)


def _preflight(model_path: str, reference_path: str) -> None:
    """The new version must load in onnxruntime and its reference must match its inputs and outputs."""
    session = create_session(model_path, 1, 1, ["CPUExecutionProvider"], [])
    inputs, outputs = load_reference(reference_path)
    want_in = sorted(m.name for m in session.get_inputs())
    want_out = sorted(m.name for m in session.get_outputs())
    if sorted(inputs) != want_in or not set(outputs) <= set(want_out) or not outputs:
        raise AgentError("the reference holds inputs %s and outputs %s; the model has inputs %s and outputs %s"
                         % (sorted(inputs), sorted(outputs), want_in, want_out), ExitCode.MODEL_INVALID)


def cmd_install(args: argparse.Namespace) -> dict:
    """Install an uploaded model as a new version next to the others and make it `current`."""
    layout = Layout(args.root)
    sha = check_version(args.sha256)
    ref_sha = check_version(args.reference_sha256)
    try:
        meta = json.loads(args.meta)
    except ValueError as exc:
        raise AgentError("--meta is not JSON: %s" % one_line(exc), ExitCode.USAGE)
    if not isinstance(meta, dict) or len(args.meta) > MAX_META_BYTES:
        raise AgentError("--meta must be a JSON object under %d bytes" % MAX_META_BYTES, ExitCode.USAGE)
    model = inside(args.model, layout.incoming)
    reference = inside(args.reference, layout.incoming)
    for path in (model, reference):
        if not os.path.isfile(path):
            raise AgentError("upload not found: %s" % path, ExitCode.MODEL_NOT_FOUND)
    with locked(layout):
        os.makedirs(layout.versions, mode=0o700, exist_ok=True)
        clean_leftovers(layout, keep_files=(model, reference))
        _check_upload(model, sha, "the model")
        _check_upload(reference, ref_sha, "the reference data")
        repaired = repair_current(layout)  # a `current` that is not intact is not the version to go back to
        history = load_history(layout)
        previous = layout.current_version()
        final = layout.version_dir(sha)
        reused = sha in layout.installed() and version_problem(layout, sha) is None
        if reused:
            for path in (model, reference):
                os.unlink(path)
        else:
            tmp = os.path.join(layout.versions, ".tmp-%s-%s" % (sha[:12], uuid.uuid4().hex[:6]))
            os.mkdir(tmp, 0o700)
            os.replace(model, os.path.join(tmp, MODEL))
            os.replace(reference, os.path.join(tmp, REFERENCE))
            try:
                _preflight(os.path.join(tmp, MODEL), os.path.join(tmp, REFERENCE))
            except AgentError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            manifest = {"sha256": sha, "reference_sha256": ref_sha, "installed_at": time.time(), "meta": meta}
            write_atomic(os.path.join(tmp, MANIFEST), json.dumps(manifest).encode())
            # Durable before it is visible: every file's data, then the folder's entries, reach the disk
            # before the folder gets its version name (and long before `current` is switched to it).
            for name in (MODEL, REFERENCE, MANIFEST):
                fsync_file(os.path.join(tmp, name))
            fsync_dir(tmp)
            if os.path.exists(final):  # a folder under this name that is not this model: set it aside
                os.rename(final, os.path.join(layout.versions, ".tmp-broken-%s" % uuid.uuid4().hex[:6]))
            os.rename(tmp, final)
            fsync_dir(layout.versions)
        if previous != sha:
            save_history(layout, history + [sha])  # recorded first: a crash before the switch is undone on read
            switch_current(layout, sha)  # and then deploy/ itself is fsynced
        kept, removed = prune(layout, load_history(layout), args.keep)
        clean_leftovers(layout)
    result = {"version": sha, "previous": previous, "unchanged": previous == sha, "reused": reused,
              "kept": kept, "removed": removed}
    if repaired is not None:
        result["fallback"] = repaired
    if args.health:  # the health check of the new current, in the same process (one interpreter start less)
        result["health"] = cmd_health(argparse.Namespace(root=args.root, version=sha, runs=None, time_budget=None))
    result["current"] = summary(layout, sha)
    return result


def cmd_rollback(args: argparse.Namespace) -> dict:
    """Go back to the version active before `current` (or to --to); --from makes it a no-op unless current is that."""
    layout = Layout(args.root)
    with locked(layout):
        history = load_history(layout)
        current = layout.linked_version()  # intact or not: a rollback is how a device leaves a broken version
        if args.from_version and current != check_version(args.from_version):
            return {"rolled_back": False, "from": current, "to": current, "current": summary(layout, current),
                    "reason": "current is not %s..." % args.from_version[:12]}
        installed = layout.installed()
        if args.to:
            target = check_version(args.to)
            if target not in installed:
                raise AgentError("version %s... is not installed" % target[:12], ExitCode.MODEL_NOT_FOUND)
            history = history + [target]
        else:
            if current is None:
                raise AgentError("no current version to roll back from", ExitCode.MODEL_NOT_FOUND)
            history = [v for v in history[:-1] if v in installed]
            target = history[-1] if history else None
            if target is None and not args.allow_empty:
                raise AgentError("no previous version to roll back to", ExitCode.MODEL_NOT_FOUND)
        save_history(layout, history)
        switch_current(layout, target)
    return {"rolled_back": True, "from": current, "to": target, "current": summary(layout, target)}


def cmd_status(args: argparse.Namespace) -> dict:
    """What the device has: the current version, the previous one, every version kept, the last health check."""
    layout = Layout(args.root)
    current, repaired = checked_current(layout)
    history = load_history(layout)
    previous = history[-2] if current is not None and len(history) > 1 else None
    order = [v for v in reversed(history)] + [v for v in layout.installed() if v not in history]
    seen = []
    for v in order:
        if v not in seen and v in layout.installed():
            seen.append(v)
    result = {"current": summary(layout, current), "previous": previous,
              "versions": [summary(layout, v) for v in seen], "last_health": read_json(layout.health)}
    if repaired is not None:
        result["fallback"] = repaired
    return result


# ------------------------------------------------------------------------------------------- CLI


def add_parsers(sub) -> None:
    """The rollout commands, added to the agent's argparse subcommands."""
    def root(p):
        p.add_argument("--root", required=True, help="the agent's folder on this device (deploy/ is under it)")
        return p

    i = root(sub.add_parser("install", help="install an uploaded model as a new version and make it current"))
    i.add_argument("--model", required=True, help="the uploaded model, in deploy/incoming/")
    i.add_argument("--sha256", required=True, help="the model's expected sha256")
    i.add_argument("--reference", required=True,
                   help="the uploaded reference inputs/outputs (.npz), in deploy/incoming/")
    i.add_argument("--reference-sha256", required=True, help="the reference file's expected sha256")
    i.add_argument("--meta", default="{}", help="JSON object stored with the version (run, candidate, health spec)")
    i.add_argument("--keep", type=bounded(int, 2), default=3,
                   help="versions kept on the device (default 3, at least 2)")
    i.add_argument("--health", action="store_true", help="then health-check the new current (as `health` does)")
    h = root(sub.add_parser("health", help="check current: reference outputs and latency"))
    h.add_argument("--version", default=None, help="check this installed version instead of current")
    h.add_argument("--runs", type=bounded(int, 1), default=None, help="timed runs (default: the version's spec)")
    h.add_argument("--time-budget", type=bounded(float, 0.001), default=None, help="seconds of timed runs")
    r = root(sub.add_parser("rollback", help="make the previous version current again"))
    r.add_argument("--from", dest="from_version", default=None, help="only if current is this version")
    r.add_argument("--to", default=None, help="this installed version instead of the previous one")
    r.add_argument("--allow-empty", action="store_true", help="with no previous version, remove current")
    root(sub.add_parser("status", help="current, previous and kept versions, last health check"))
    w = root(sub.add_parser("watch", help="service mode: health-check current periodically and on change"))
    w.add_argument("--interval", type=bounded(float, 0.001), default=3600.0, help="seconds between checks")
    w.add_argument("--count", type=bounded(int, 1), default=None, help="stop after this many checks")


COMMANDS = {"install": cmd_install, "health": cmd_health, "rollback": cmd_rollback, "status": cmd_status,
            "watch": cmd_watch}
