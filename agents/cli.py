"""The agent's command line: ``python -m agents {info,bench,compare,run,sha256,install,health,rollback,status,watch}``.

Every command prints exactly one JSON object on stdout (``schema_version`` 1) and returns an
``ExitCode``; errors, usage errors included, are reported as
``{"schema_version": 1, "command": ..., "error": ..., "exit_code": N}``. Runs on the device: see
agents/kernel.py.
"""

from __future__ import annotations

import argparse
import json
import sys

from agents import compare, deploy
from agents.benchmark import NOISY_CV, STABLE_WINDOW, cmd_bench, cmd_run
from agents.info import cmd_info, cmd_sha256
from agents.kernel import SCHEMA_VERSION, AgentError, ExitCode, bounded, one_line, parse_axes

COMMANDS = {"info": cmd_info, "bench": cmd_bench, "run": cmd_run, "sha256": cmd_sha256,
            "compare": compare.cmd_compare, **deploy.COMMANDS}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """ArgumentParser that raises instead of exiting, so usage errors are reported as JSON too."""

    def error(self, message):
        self.print_usage(sys.stderr)
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The agent's command line: `info`, `bench`, `run`, `sha256`, and the rollout's commands (agents/deploy.py)."""
    parser = _Parser(prog="python -m agents", description="Edge measurement agent (prints one JSON object).")
    sub = parser.add_subparsers(dest="command", metavar="{info,bench,compare,run,sha256,%s}" % deploy.COMMANDS_HELP)
    sub.required = True
    sub.add_parser("info", help="describe this device")
    h = sub.add_parser("sha256", help="SHA-256 and size of a file (checks an upload)")
    h.add_argument("--file", required=True, help="path of the file")
    r = sub.add_parser("run", help="run a model on given inputs, save its outputs")
    r.add_argument("--model", required=True, help="path to the .onnx file")
    r.add_argument("--inputs", required=True, help=".npy (the model's one input) or .npz (by input name)")
    r.add_argument("--outputs", required=True, help=".npy (first output) or .npz (all outputs, by name)")
    r.add_argument("--threads", type=bounded(int, 0), default=1, help="intra-op threads, 0 = all (default 1)")
    r.add_argument("--inter-op-threads", type=bounded(int, 0), default=1, help="inter-op threads (default 1)")
    r.add_argument("--providers", default="CPUExecutionProvider", help="comma-separated execution providers")
    b = sub.add_parser("bench", help="benchmark one ONNX model")
    b.add_argument("--model", required=True, help="path to the .onnx file")
    b.add_argument("--warmup", type=bounded(int, 0), default=20,
                   help="warm-up runs; with --warmup-until-stable the least of them (default 20)")
    b.add_argument("--warmup-until-stable", action="store_true",
                   help="go on warming up until the CV of the last --stable-window runs is <= --stable-cv, "
                        "--warmup-max runs or --time-budget seconds")
    b.add_argument("--warmup-max", type=bounded(int, 0), default=1000,
                   help="most warm-up runs with --warmup-until-stable (default 1000)")
    b.add_argument("--stable-window", type=bounded(int, 2), default=STABLE_WINDOW,
                   help="last warm-up runs whose CV judges stability (default %d)" % STABLE_WINDOW)
    b.add_argument("--stable-cv", type=bounded(float, 0, strict=True), default=NOISY_CV,
                   help="stable when that CV is at most this (default %g)" % NOISY_CV)
    b.add_argument("--runs", type=bounded(int, 1), default=200, help="timed runs (default 200)")
    b.add_argument("--time-budget", type=bounded(float, 0, strict=True), default=10.0,
                   help="stop warm-up, and then timed runs, after this many seconds each, "
                        "after at least 1 and 5 runs (default 10)")
    b.add_argument("--threads", type=bounded(int, 0), default=1, help="intra-op threads, 0 = all (default 1)")
    b.add_argument("--inter-op-threads", type=bounded(int, 0), default=1, help="inter-op threads (default 1)")
    b.add_argument("--providers", default="CPUExecutionProvider", help="comma-separated execution providers")
    b.add_argument("--batch", type=bounded(int, 1), default=1, help="size of symbolic batch dimensions")
    b.add_argument("--pin-cpu", type=bounded(int, 0), default=None, help="pin the process to this CPU")
    b.add_argument("--power-idle-w", type=bounded(float, 0), default=None, help="power model: idle watts")
    b.add_argument("--power-active-w", type=bounded(float, 0), default=None,
                   help="power model: watts with all --power-cores busy")
    b.add_argument("--power-cores", type=bounded(int, 1), default=None,
                   help="power model: cores behind --power-active-w (default: this device's cores)")
    b.add_argument("--count-marks", action="store_true",
                   help="mark each timed run for an instruction-counting QEMU plugin (emulated devices only)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    b.add_argument("--axes", type=parse_axes, default={}, metavar="NAME=SIZE,...",
                   help="sizes of named dynamic axes (e.g. sequence=128); others are timed at 1")
    b.add_argument("--exit-on-stdin-eof", action="store_true",
                   help="stop at once when stdin closes (the host's SSH connection is gone)")
    compare.add_parser(sub)
    deploy.add_parsers(sub)
    return parser


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Run the agent; prints one JSON object on stdout and returns an ExitCode value."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        result = COMMANDS[command](args)
        _emit(dict({"schema_version": SCHEMA_VERSION, "command": command}, **result))
        return int(ExitCode.OK)
    except _UsageError as exc:
        code, message = ExitCode.USAGE, one_line(exc)
    except AgentError as exc:
        code, message = exc.code, one_line(exc)
    except KeyboardInterrupt:
        code, message = ExitCode.ERROR, "interrupted"
    except Exception as exc:  # noqa: BLE001 - never a traceback on the device
        code, message = ExitCode.ERROR, "%s: %s" % (type(exc).__name__, one_line(exc))
    _emit({"schema_version": SCHEMA_VERSION, "command": command, "error": message, "exit_code": int(code)})
    return int(code)
