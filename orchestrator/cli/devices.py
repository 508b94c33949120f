"""`orchestrate devices ...`: register, emulate, list, show, probe, remove, import and calibrate devices
(docs/devices.md; calibrate: docs/emulation.md).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
from rich.table import Table

from orchestrator.cli.console import out_console
from orchestrator.cli.format import ago, cell, deployment_columns, deployment_json, deployment_lines, printable
from orchestrator.devices.base import CONNECT_TIMEOUT_S, DEFAULT_REMOTE_DIR
from orchestrator.devices.registry import DeviceRegistry
from orchestrator.errors import ExitCode, InventoryError, OrchestratorError
from orchestrator.fleet.emulated import emulate_device
from orchestrator.fleet.inventory import ignored_secrets, read_inventory, to_registration
from orchestrator.fleet.probe import probe_device, remove_device
from orchestrator.fleet.registration import Registration, register_device

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME_RULE = "letters, digits, '.', '_' and '-' only, starting with a letter or digit"


def _valid_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):  # `$` alone would let a name end in a newline
        raise click.BadParameter(NAME_RULE)
    return value


def _confirmer(yes: bool) -> Callable[[str], bool]:
    """How a host key offered for the first time gets confirmed: --yes, else a question on the terminal."""
    def confirm(question: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            raise click.UsageError("the host key cannot be confirmed without a terminal: "
                                   "pass --host-key-fingerprint SHA256:... or --yes")
        return click.confirm(question, default=False, err=True)
    return confirm


def _summary(info: dict[str, Any]) -> str:
    """What the device's agent reported, in one line (escaped: the device wrote it)."""
    memory = f"{info['memory_mb']} MB" if info.get("memory_mb") else "memory unknown"
    sensors = ", ".join(map(str, info.get("energy_sensors") or [])) or "none (energy is estimated)"
    return printable(f"{info.get('arch')}, {info.get('cpu_model')}, {info.get('cores')} cores, {memory}, "
                     f"onnxruntime {info.get('onnxruntime')} ({', '.join(map(str, info.get('providers') or []))}), "
                     f"energy sensors: {sensors}")


@click.group()
def devices() -> None:
    """Devices in the registry: register, emulate, list, show, probe, remove, import, calibrate."""


@devices.command("register")
@click.argument("name", callback=_valid_name)
@click.option("--host", required=True, help="Host name or address of the device.")
@click.option("--port", default=22, show_default=True, type=click.IntRange(1, 65535))
@click.option("--user", required=True, help="Login on the device.")
@click.option("--key", "key_path", type=click.Path(exists=True, dir_okay=False, resolve_path=True),
              help="Private key file (default: ssh-agent, then the usual ~/.ssh keys). Never a password.")
@click.option("--profile", "profile_path", required=True, type=click.Path(path_type=Path),
              help="The device's profile YAML (its arch, memory and runtime are checked).")
@click.option("--tag", "tags", multiple=True, help="A tag (repeatable).")
@click.option("--python", default="python3", show_default=True,
              help="The device's Python 3.9+ (with numpy and onnxruntime).")
@click.option("--remote-dir", default=DEFAULT_REMOTE_DIR, show_default=True,
              help="The agent's folder on the device (relative: under the login's home).")
@click.option("--host-key-fingerprint", help="Pin only a host key with this SHA256:... fingerprint.")
@click.option("--known-hosts", default="~/.ssh/known_hosts", show_default=True,
              help="known_hosts file that may vouch for the host key.")
@click.option("--connect-timeout", default=CONNECT_TIMEOUT_S, show_default=True, type=click.FloatRange(min=0.1))
@click.option("--yes", is_flag=True, help="Pin the offered host key without asking (scripts).")
def register(name: str, host: str, port: int, user: str, key_path: str | None, profile_path: Path,
             tags: tuple[str, ...], python: str, remote_dir: str, host_key_fingerprint: str | None,
             known_hosts: str, connect_timeout: float, yes: bool) -> None:
    """Register a device: pin its host key, install the agent, check it fits the profile.

    \b
    orchestrate devices register pi-kitchen --host 192.168.1.20 --user pi \\
        --profile device_profiles/rpi4.yaml --tag kitchen
    """
    reg = Registration(name=name, host=host, port=port, user=user, key_path=key_path, profile_path=str(profile_path),
                       tags=list(tags), python=python, remote_dir=remote_dir,
                       host_key_fingerprint=host_key_fingerprint, known_hosts=known_hosts,
                       connect_timeout_s=connect_timeout)
    device, how = register_device(reg, _confirmer(yes))
    how = "accepted with --yes" if how == "confirmed" and yes else how
    click.echo(printable(f"registered {device.name}: profile {device.profile}, "
                         f"{device.user}@{device.host}:{device.port}"))
    click.echo(printable(f"  host key {device.host_key.split()[0]} {device.host_key_fingerprint} pinned ({how})"))
    click.echo(f"  {_summary(device.info)}")


@devices.command("emulate")
@click.argument("profile_path", metavar="PROFILE", type=click.Path(path_type=Path))
@click.option("--mode", type=click.Choice(["user", "system"]), default="user", show_default=True,
              help="QEMU user mode (the agent under qemu-aarch64-static), or a full-system VM reached over SSH "
                   "(started in the background; it runs until `devices remove`).")
@click.option("--name", callback=lambda ctx, param, value: value and _valid_name(ctx, param, value),
              help="Device name (default: emulated-<profile name>).")
@click.option("--tag", "tags", multiple=True, help="A tag (repeatable).")
@click.option("--sysroot", type=click.Path(file_okay=False, path_type=Path),
              help="The arm64 sysroot to use or build (default: the shared cached one).")
def emulate(profile_path: Path, mode: str, name: str | None, tags: tuple[str, ...], sysroot: Path | None) -> None:
    """Build (cached) and register the QEMU-emulated device of a profile's `emulation` section.

    \b
    orchestrate devices emulate device_profiles/rpi4.yaml        # registers emulated-rpi4
    orchestrate devices emulate device_profiles/rpi4.yaml --mode system   # an arm64 VM over SSH
    """
    device, notes = emulate_device(profile_path, name, mode, sysroot, list(tags),
                                   log=lambda m: click.echo(m, err=True))
    extra = device.extra
    if extra.get("mode") == "system":
        click.echo(f"registered {device.name}: profile {device.profile}, emulated (QEMU full-system VM, "
                   f"-cpu {extra['qemu_cpu']}, {extra['cores']} cores, {extra['memory_mb']} MB), "
                   f"{device.user}@{device.host}:{device.port}")
        click.echo(f"  host key {device.host_key.split()[0]} {device.host_key_fingerprint} pinned "
                   "(generated on this host with the image)")
        click.echo(f"  {_summary(device.info)}")
        for note in notes:
            click.echo(f"  note: {note}")
        click.echo(f"  the VM (pid {extra['vm_pid']}, SSH answered {extra['ssh_seconds']} s after start) keeps running "
                   f"in the background until `orchestrate devices remove {device.name}`; runs do not measure on it "
                   "(its latency is the emulator's), it is for the SSH path end to end on an ARM stack")
        return
    click.echo(f"registered {device.name}: profile {device.profile}, emulated (QEMU {extra['mode']} mode, "
               f"-cpu {device.info.get('qemu_cpu') or extra['qemu_cpu']})")
    click.echo(f"  {_summary(device.info)}")
    for note in notes:
        click.echo(f"  note: {note}")
    click.echo("  runs check each candidate under the emulator (aarch64 onnxruntime, outputs against this host's) "
               "and take its latency from this host x the profile's emulation.latency_scale (docs/emulation.md)")


@devices.command("list")
@click.option("--profile", "profile_name", help="Only the devices of this profile (by name).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_devices(profile_name: str | None, as_json: bool) -> None:
    """The registered devices: name, profile, host, arch, status, last seen, deployed model, health, tags."""
    rows = DeviceRegistry().list(profile_name)
    if as_json:
        deployed = deployment_json(rows)
        click.echo(json.dumps([{**d.as_dict(), "deployment": deployed[d.name]} for d in rows], indent=2))
        return
    if not rows:
        click.echo("no devices registered (orchestrate devices register --help)")
        return


    table = Table("name", "profile", "host", "arch", "status", "last seen", "deployed model", "health", "tags")
    deployed = deployment_columns(rows)  # the rollout's columns (orchestrator/cli/deploy.py)
    for d in rows:  # every cell escaped: names, hosts and tags may come from an inventory, arch from the device
        status = {"online": "[green]online[/green]", "offline": "[red]offline[/red]"}.get(
            d.status, f"[red]{cell(d.status)}[/red]")
        table.add_row(cell(d.name), cell(d.profile), cell(d.address),
                      cell(f"{d.arch or '-'}{' (emulated)' if d.emulated or d.emulated_vm else ''}"),
                      status, ago(d.last_seen),
                      *map(cell, deployed[d.name]), cell(", ".join(d.tags) or "-"))
    out_console().print(table)


@devices.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="The registry entry as JSON.")
def show(name: str, as_json: bool) -> None:
    """One device: how it is reached, its pinned host key, what its agent last reported."""
    d = DeviceRegistry().get(name)
    if as_json:
        click.echo(json.dumps(d.as_dict(), indent=2))
        return
    reach = [
        ("address", f"{d.user}@{d.host}:{d.port}"),
        ("key", d.key_path or "ssh-agent / ~/.ssh keys"),
        ("host key", f"{d.host_key.split()[0]} {d.host_key_fingerprint} (pinned)"),
        ("python", d.python),
        ("remote dir", d.remote_dir),
    ] if not d.emulated else [
        ("emulated", f"QEMU {d.extra.get('mode', 'user')} mode, -cpu {d.extra.get('qemu_cpu')}, "
                     f"{d.extra.get('cores')} cores, {d.extra.get('memory_mb')} MB"),
        ("sysroot", d.extra.get("sysroot", "-")),
        ("device view", d.extra.get("view", "-")),
    ]
    lines = [
        ("profile", f"{d.profile} ({d.profile_path})"),
        *reach,
        ("tags", ", ".join(d.tags) or "-"),
        ("status", d.status + (f": {d.status_reason}" if d.status_reason else "")),
        ("last seen", ago(d.last_seen)),
        ("registered", time.strftime("%Y-%m-%d %H:%M", time.localtime(d.registered_at))),
        ("deployed model", d.deployed_model or "-"),
        ("device", _summary(d.info) if d.info else "-"),
    ]

    at = next((i + 1 for i, (key, _) in enumerate(lines) if key == "deployed model"), len(lines))
    lines[at:at] = deployment_lines(d)  # the rollout's lines (orchestrator/cli/deploy.py)
    click.echo(printable(d.name))
    for key, value in lines:  # escaped: the device and the inventory wrote much of it
        click.echo(f"  {key + ':':<16}{printable(value)}")


@devices.command("probe")
@click.argument("names", nargs=-1)
@click.pass_context
def probe(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Connect to devices (all when no NAME is given), refresh what their agent reports, and their status."""
    registry = DeviceRegistry()
    names = names or tuple(d.name for d in registry.list())
    if not names:
        click.echo("no devices registered")
        return
    code = ExitCode.OK
    for name in names:
        try:
            device, problems = probe_device(name, registry)
        except OrchestratorError as exc:
            click.echo(f"error: {printable(exc)}", err=True)
            code = code or exc.exit_code
            continue
        click.echo(f"{printable(device.name)}: online, {_summary(device.info)}")
        for problem in problems:
            click.echo(printable(f"warning: {device.name} no longer fits profile {device.profile!r}: {problem}"),
                       err=True)
    ctx.exit(code)


@devices.command("remove")
@click.argument("name")
def remove(name: str) -> None:
    """Forget a device (the agent's folder on a real device is left as it is; an emulated one's view goes,
    an emulated VM is stopped)."""
    click.echo(remove_device(name))


@devices.command("import")
@click.argument("inventory", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--profiles-dir", default=Path("device_profiles"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Where groups named like a profile are looked up.")
@click.option("--dry-run", is_flag=True, help="Show what would be registered; connect to nothing.")
@click.option("--yes", is_flag=True, help="Pin host keys seen for the first time without asking.")
@click.pass_context
def import_inventory(ctx: click.Context, inventory: Path, profiles_dir: Path, dry_run: bool, yes: bool) -> None:
    """Register every host of an Ansible-style YAML inventory (groups become profiles or tags)."""
    hosts = read_inventory(inventory)
    for host in hosts:  # the rule `devices register` applies, before anything is registered
        if not NAME_PATTERN.fullmatch(host.name):
            raise InventoryError(f"{inventory}:{host.line}: host {printable(repr(host.name))}: not a device name: "
                                 f"{NAME_RULE} (nothing was registered)")
    registry = DeviceRegistry()
    known = {d.name for d in registry.list()}
    counts = {"registered": 0, "skipped": 0, "failed": 0}
    for host in hosts:
        for var in ignored_secrets(host):
            click.echo(f"warning: {host.name}: {var} ignored (devices are reached with keys only)", err=True)
        try:
            reg = to_registration(host, inventory, profiles_dir)
            if reg.name in known:
                click.echo(f"skipped {reg.name}: already registered")
                counts["skipped"] += 1
                continue
            if dry_run:  # host, user, profile and tags are the inventory's own text: escaped
                click.echo(printable(f"would register {reg.name}: {reg.user}@{reg.host}:{reg.port}, "
                                     f"profile {reg.profile_path}, tags {', '.join(reg.tags) or '-'}"))
                continue
            device, how = register_device(reg, _confirmer(yes), registry)
        except OrchestratorError as exc:
            click.echo(f"failed {host.name}: {printable(exc)}", err=True)
            counts["failed"] += 1
            continue
        click.echo(printable(f"registered {device.name}: profile {device.profile}, "
                             f"{device.user}@{device.host}:{device.port}, host key {device.host_key_fingerprint} "
                             f"({'accepted with --yes' if how == 'confirmed' and yes else how})"))
        counts["registered"] += 1
    if not dry_run:
        click.echo(", ".join(f"{n} {what}" for what, n in counts.items()))
    ctx.exit(ExitCode.ERROR if counts["failed"] else ExitCode.OK)


@devices.command("calibrate")
@click.argument("name")
@click.option("--rounds", default=20, show_default=True, type=click.IntRange(3, 200),
              help="Interleaved rounds of the suite on the board.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1, 16),
              help="Twin counts run at a time (counts do not depend on the host's load).")
@click.option("--json", "as_json", is_flag=True, help="Print the stored calibration as JSON.")
def calibrate(name: str, rounds: int, jobs: int, as_json: bool) -> None:
    """Fit the emulated twin's cost model to a real board: the fixed suite timed on NAME and counted on its twin;
    stored for NAME's profile, whose emulated device then says calibrated (docs/emulation.md)."""
    from orchestrator.fleet.calibration import calibrate_registered  # numpy and the emulators: only when it runs

    record = calibrate_registered(name, rounds=rounds, jobs=jobs,
                                  log=lambda line: click.echo(printable(line), err=True))
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    fit, half = record["fit"], record["held_out_half"]
    click.echo(printable(f"calibrated profile {record['profile']} on board {record['board']} ({record['date']}): "
                         f"cpi {record['cpi']:.3f} at {record['clock_mhz']:g} MHz"
                         + (f" + {record['intercept_ms'] * 1e3:.1f} us per run" if record["with_intercept"] else "")))
    click.echo(f"  twin: {printable(record['twin'])}")
    for item in record["items"]:
        click.echo(printable(f"  {item['name']:<34} {item['instructions']:>13,.0f} instructions  board "
                             f"{item['board_ms']:9.4f} ms  model {item['predicted_ms']:9.4f} ms  {item['error']:+.0%}"))
    click.echo(f"  fit: median |error| {fit['in_sample']['median_abs_error']:.0%}, leave-one-out "
               f"{fit['leave_one_out']['median_abs_error']:.0%}; fitted on half, the other half: median |error| "
               f"{half['median_abs_error']:.0%}, Kendall tau {half['kendall_tau']:.2f}")
    click.echo(printable(f"  stored in {record['path']}"))
