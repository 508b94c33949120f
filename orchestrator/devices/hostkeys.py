"""Host keys: what a server offers, what known_hosts says, and the `TYPE BASE64` form the registry pins.

No authentication happens here: these only look at the key a server presents in the handshake.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import socket

import paramiko

from orchestrator.errors import DeviceUnreachable, HostKeyMismatch

if logging.getLogger("paramiko").level == logging.NOTSET:
    # paramiko logs every refused handshake and lost link with a traceback; we report each as one line.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)

# Host key algorithms asked for one by one when looking for a key that matches a given fingerprint.
HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "rsa-sha2-512")


def host_key_name(host: str, port: int) -> str:
    """The name a host key is filed under, as in known_hosts: `host`, or `[host]:port` off port 22."""
    return host if port == 22 else f"[{host}]:{port}"


def parse_host_key(line: str) -> paramiko.PKey:
    """A public key from `TYPE BASE64` (a known_hosts entry without the host name)."""
    parts = line.split()
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except (IndexError, binascii.Error, paramiko.SSHException, ValueError) as exc:
        raise HostKeyMismatch(f"the pinned host key {line[:40]!r} cannot be read: {exc}") from None


def host_key_line(key: paramiko.PKey) -> str:
    """`TYPE BASE64` of a public key, the form the registry pins."""
    return f"{key.get_name()} {key.get_base64()}"


def reason(exc: BaseException) -> str:
    """A connection error as a few words: "connection refused", "timed out", or the error's own text."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return "connection refused"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def offered_host_key(host: str, port: int, timeout: float, key_type: str | None = None) -> paramiko.PKey:
    """The host key the SSH server at host:port offers (of `key_type`, if given). No authentication happens."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise DeviceUnreachable(f"cannot connect to {host}:{port}: {reason(exc)}") from None
    transport = paramiko.Transport(sock)
    if key_type:
        transport.get_security_options().key_types = [key_type]
    try:
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise DeviceUnreachable(f"{host}:{port}: SSH handshake failed: {reason(exc)}") from None
    finally:
        transport.close()


def offered_host_keys(host: str, port: int, timeout: float) -> list[paramiko.PKey]:
    """Every host key the server offers, one handshake per key type."""
    keys: list[paramiko.PKey] = []
    for key_type in HOST_KEY_TYPES:
        try:
            key = offered_host_key(host, port, timeout, key_type)
        except DeviceUnreachable:
            continue  # the server has no key of this type
        if all(key != k for k in keys):
            keys.append(key)
    return keys


def known_hosts_keys(host: str, port: int, path: str = "~/.ssh/known_hosts") -> list[paramiko.PKey]:
    """The keys a known_hosts file holds for host:port (hashed names included); [] if none or no file."""
    try:
        entries = paramiko.HostKeys(os.path.expanduser(path))
    except (OSError, paramiko.SSHException):
        return []
    found = entries.lookup(host_key_name(host, port))
    return list(found.values()) if found else []
