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

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator

from orchestrator.config.profile import line_of, read_yaml, validation_message
from orchestrator.devices.base import DEFAULT_REMOTE_DIR
from orchestrator.errors import InventoryError
from orchestrator.fleet.registration import Registration

PASSWORD_VARS = ("ansible_password", "ansible_ssh_pass", "ansible_become_password", "ansible_become_pass")
IMPLICIT_GROUPS = ("all", "ungrouped")
#: An inventory is refused over this size before it is read (about 100,000 hosts).
MAX_INVENTORY_BYTES = 10 * 1024 * 1024


class HostVars(BaseModel):
    """The variables we read, typed; any other variable is kept as it is (Ansible has many)."""

    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True)

    ansible_host: str | None = None
    ansible_port: int | None = Field(default=None, ge=1, le=65535)
    ansible_user: str | None = None
    ansible_ssh_private_key_file: str | None = None
    ansible_private_key_file: str | None = None
    ansible_python_interpreter: str | None = None
    edge_profile: str | None = None
    edge_tags: list[str] | None = None
    edge_host_key_fingerprint: str | None = None
    edge_remote_dir: str | None = None

    @field_validator("ansible_port", mode="before")
    @classmethod
    def _port_is_not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would read `true` as port 1
            raise ValueError(f"expected a port number, not {str(value).lower()}")  # noqa: TRY004 (pydantic wants it)
        return value


class Group(BaseModel):
    """One group: its hosts (name -> variables), its variables, its child groups."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    hosts: dict[str, HostVars | None] | None = None
    vars: HostVars | None = None
    children: dict[str, Group | None] | None = None


class Inventory(RootModel[dict[str, Group | None]]):
    """A whole inventory: group name -> group."""

    model_config = ConfigDict(coerce_numbers_to_str=True)


@dataclass
class InventoryHost:
    """One host of an inventory: its merged variables and the groups it is in (outermost first)."""

    name: str
    groups: list[str] = field(default_factory=list)
    group_vars: dict[str, Any] = field(default_factory=dict)
    host_vars: dict[str, Any] = field(default_factory=dict)
    line: int = 1  # where the inventory first names it

    @property
    def vars(self) -> dict[str, Any]:
        """Group variables overridden by host variables."""
        return {**self.group_vars, **self.host_vars}


def _set(variables: HostVars | None) -> dict[str, Any]:
    return variables.model_dump(exclude_unset=True) if variables is not None else {}


def read_inventory(path: str | Path) -> list[InventoryHost]:
    """Every host in a YAML inventory, in the order first seen.

    The file is read like a profile (size cap, UTF-8, no duplicate keys or recursive aliases)
    and validated with pydantic; any problem is an InventoryError `FILE:LINE: group.path: message`.
    """
    path = Path(path)
    _, node, data = read_yaml(path, "inventory", InventoryError, MAX_INVENTORY_BYTES)
    if not isinstance(data, dict):
        raise InventoryError(f"{path}:1: (top level): an inventory is a YAML mapping of groups (e.g. `all:`), "
                             f"got {type(data).__name__ if data is not None else 'nothing'}")
    try:
        inventory = Inventory.model_validate(data).root
    except ValidationError as exc:
        raise InventoryError(validation_message(path, node, exc)) from None
    hosts: dict[str, InventoryHost] = {}

    def walk(group: str, body: Group | None, inherited: dict[str, Any], lineage: list[str],
             loc: tuple[str, ...]) -> None:
        if body is None:
            return
        group_vars = {**inherited, **_set(body.vars)}
        for name, host_vars in (body.hosts or {}).items():
            if name not in hosts:
                hosts[name] = InventoryHost(name, line=line_of(node, (*loc, "hosts", name)))
            host = hosts[name]
            host.groups += [g for g in [*lineage, group] if g not in host.groups]
            host.group_vars.update(group_vars)
            host.host_vars.update(_set(host_vars))
        for child, child_body in (body.children or {}).items():
            walk(child, child_body, group_vars, [*lineage, group], (*loc, "children", child))

    top = inventory.get("all")
    top_vars = _set(top.vars) if top is not None else {}
    for group, body in inventory.items():
        walk(group, body, {} if group == "all" else top_vars, [], (group,))
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
        port=v.get("ansible_port") or 22,
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
