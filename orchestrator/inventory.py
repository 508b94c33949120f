"""Ansible-style YAML inventories: the hosts to register, with their profile and tags.

    all:
      vars: {ansible_user: pi, ansible_ssh_private_key_file: ~/.ssh/fleet_ed25519}
      children:
        rpi4:                     # a group named like a profile file (device_profiles/rpi4.yaml): the profile
          hosts:
            pi-kitchen: {ansible_host: 192.168.1.20}
            pi-garage: {ansible_host: 192.168.1.21, ansible_port: 2222}
        garden:                   # any other group: a tag
          hosts:
            pi-garage:

Variables (host vars win over group vars, a child group's over its parent's):
`ansible_host` (default: the inventory name), `ansible_port` (22), `ansible_user`
(default: you), `ansible_ssh_private_key_file` (default: ssh-agent),
`ansible_python_interpreter` (python3), and ours: `edge_profile` (a profile file,
instead of a group named like one), `edge_tags` (a list), `edge_host_key_fingerprint`
(SHA256:..., to pin), `edge_remote_dir`. Password variables are ignored: devices are
reached with keys only.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.devices import DEFAULT_REMOTE_DIR
from orchestrator.errors import InventoryError
from orchestrator.fleet import Registration

PASSWORD_VARS = ("ansible_password", "ansible_ssh_pass", "ansible_become_password", "ansible_become_pass")
IMPLICIT_GROUPS = ("all", "ungrouped")


@dataclass
class InventoryHost:
    """One host of an inventory: its merged variables and the groups it is in (outermost first)."""

    name: str
    groups: list[str] = field(default_factory=list)
    group_vars: dict[str, Any] = field(default_factory=dict)
    host_vars: dict[str, Any] = field(default_factory=dict)

    @property
    def vars(self) -> dict[str, Any]:
        """Group variables overridden by host variables."""
        return {**self.group_vars, **self.host_vars}


def read_inventory(path: str | Path) -> list[InventoryHost]:
    """Every host in a YAML inventory, in the order first seen."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InventoryError(f"{path}: inventory not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InventoryError(f"{path}:{mark.line + 1 if mark else 1}: not YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise InventoryError(f"{path}: an inventory is a YAML mapping of groups (e.g. `all:`)")
    hosts: dict[str, InventoryHost] = {}

    def walk(group: str, body: Any, inherited: dict[str, Any], lineage: list[str]) -> None:
        if body is None:
            return
        if not isinstance(body, dict):
            raise InventoryError(f"{path}: group {group!r} must be a mapping with hosts/vars/children")
        group_vars = {**inherited, **(body.get("vars") or {})}
        for name, host_vars in (body.get("hosts") or {}).items():
            host = hosts.setdefault(str(name), InventoryHost(str(name)))
            host.groups += [g for g in [*lineage, group] if g not in host.groups]
            host.group_vars.update(group_vars)
            host.host_vars.update(host_vars or {})
        for child, child_body in (body.get("children") or {}).items():
            walk(str(child), child_body, group_vars, [*lineage, group])

    top_vars = ((data.get("all") or {}).get("vars") or {}) if isinstance(data.get("all"), dict) else {}
    for group, body in data.items():
        walk(str(group), body, {} if group == "all" else top_vars, [])
    return list(hosts.values())


def to_registration(host: InventoryHost, inventory: Path, profiles_dir: Path) -> Registration:
    """The registration an inventory host asks for: profile from `edge_profile` or a group named like a profile file."""
    v = host.vars
    profile_groups = [g for g in host.groups if g not in IMPLICIT_GROUPS and (profiles_dir / f"{g}.yaml").is_file()]
    if v.get("edge_profile"):
        profile = Path(str(v["edge_profile"])).expanduser()
        if not profile.is_absolute() and (inventory.parent / profile).is_file():
            profile = inventory.parent / profile
    elif len(profile_groups) == 1:
        profile = profiles_dir / f"{profile_groups[0]}.yaml"
    elif profile_groups:
        raise InventoryError(f"host {host.name!r} is in several profile groups ({', '.join(profile_groups)}); "
                             "set edge_profile for it")
    else:
        raise InventoryError(f"host {host.name!r} has no profile: put it in a group named like a profile "
                             f"in {profiles_dir}/, or set edge_profile")
    profile_name = profile.stem if not v.get("edge_profile") else None
    tags = [g for g in host.groups if g not in IMPLICIT_GROUPS and g != profile_name]
    tags += [str(t) for t in (v.get("edge_tags") or []) if str(t) not in tags]
    key = v.get("ansible_ssh_private_key_file") or v.get("ansible_private_key_file")
    return Registration(
        name=host.name,
        host=str(v.get("ansible_host") or host.name),
        port=int(v.get("ansible_port") or 22),
        user=str(v.get("ansible_user") or getpass.getuser()),
        key_path=str(key) if key else None,
        profile_path=str(profile),
        tags=tags,
        python=str(v.get("ansible_python_interpreter") or "python3"),
        remote_dir=str(v.get("edge_remote_dir") or DEFAULT_REMOTE_DIR),
        host_key_fingerprint=str(v["edge_host_key_fingerprint"]) if v.get("edge_host_key_fingerprint") else None,
    )


def ignored_secrets(host: InventoryHost) -> list[str]:
    """The password variables a host has (they are never used or stored)."""
    return [k for k in PASSWORD_VARS if k in host.vars]
