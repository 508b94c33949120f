"""Ray for the search: a local (loopback-only) or joined cluster, and Ctrl-C handling that keeps what was measured.

A local Ray (no `--ray-address`) is bound to loopback and reaped:

- Every component listens on 127.0.0.1 only: Ray rewrites a loopback `_node_ip_address` to the
  machine's outside address unless its own switch `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is set
  (ray._private.services.get_node_ip_address); with it, the node IP is 127.0.0.1 and the GCS,
  the raylet, the driver's and the workers' gRPC servers and the RuntimeEnvAgent bind to it.
  `include_dashboard=False`: no dashboard server. Token authentication is set explicitly
  (`RAY_AUTH_MODE=token`) with a token of this process's own (`RAY_AUTH_TOKEN`), so no token
  file is written to ~/.ray.
- Nothing outlives the driver: Ray's kernel fate-sharing ends its direct children (GCS, raylet)
  with the driver, but not what the raylet started (the DashboardAgent, which Ray cannot leave
  out, and the RuntimeEnvAgent wait about a minute for a dead GCS). A small reaper process,
  started after Ray, waits for the driver to end (its stdin pipe closes, also on `kill -9`) and
  ends every process of that Ray: those carrying the session's mark in their environment, and
  those with a file of the session's folder open. SIGTERM, then SIGKILL.

Joining a cluster (`--ray-address`) is bounded: nothing answering at the address is said at
once, and Ray's own connection attempts are cut to one of about 20 s (see _join).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from typing import Any, Iterator

from orchestrator.errors import OrchestratorError

LOOPBACK = "127.0.0.1"
#: The environment variable (and value) that makes Ray take 127.0.0.1 as a node's address as given.
RAY_LOOPBACK_SWITCH = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
#: Marks every process of one local Ray (in its environment), for the reaper.
SESSION_MARK = "EDGE_ORCHESTRATOR_RAY_SESSION"
REAP_GRACE_S = 2.0  # SIGTERM, then this long, then SIGKILL
TCP_CHECK_TIMEOUT_S = 5.0

# Read by Ray when it is imported (its C++ config): each attempt to reach a GCS gives up after
# this long, instead of 30 s (see _join for the number of attempts).
os.environ.setdefault("RAY_py_gcs_connect_timeout_s", "10")
# Token authentication, explicitly (Ray reads the mode when it is imported; see _start_local).
os.environ.setdefault("RAY_AUTH_MODE", "token")


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[Any]:
    """Join `address`, or start a quiet local Ray bound to loopback; always shut it down."""
    import ray

    if ray.is_initialized():  # a caller (a test session, a notebook) owns Ray: use it, leave it running
        yield ray
        return
    quiet: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    reaper: Reaper | None = None
    if address:
        _join(ray, address, quiet)
    else:
        reaper = _start_local(ray, num_cpus or os.cpu_count() or 1, quiet)
    try:
        yield ray
    finally:
        try:
            ray.shutdown()
        finally:
            if reaper is not None:
                reaper.release()


# ------------------------------------------------------------------------------- a local Ray


def _start_local(ray: Any, num_cpus: int, quiet: dict[str, Any]) -> Reaper:
    """ray.init a new local Ray on loopback, with token auth, its processes marked; then its reaper."""
    mark = secrets.token_hex(8)
    switch, off = RAY_LOOPBACK_SWITCH
    changed = os.environ.get("RAY_AUTH_MODE") != "token"
    if "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ:
        # One token per process (Ray caches the first it reads), in the environment only: Ray's
        # default would write it to ~/.ray/auth_token, readable by whoever reads that folder.
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        changed = True
    saved = {name: os.environ.get(name) for name in (SESSION_MARK, switch)}
    os.environ.update({SESSION_MARK: mark, switch: off, "RAY_AUTH_MODE": "token"})
    if changed:  # Ray read its config when it was imported: have it read the mode and token again
        _reload_ray_config()
    constants = _ray_constants()
    cluster = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if constants is not None and cluster is not None:
        constants.ENABLE_RAY_CLUSTER = False  # the switch, where Ray was imported before it was set
    try:
        # "local": always a new local Ray, even where RAY_ADDRESS points elsewhere
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK, **quiet)
    finally:
        for name, value in saved.items():  # only Ray's processes, started by now, keep the mark
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if constants is not None and cluster is not None:
            constants.ENABLE_RAY_CLUSTER = cluster
    reaper = Reaper(mark, _session_dir(ray))
    import ray.util

    node = ray.util.get_node_ip_address()
    if not _is_loopback(node):
        ray.shutdown()
        reaper.release()
        raise OrchestratorError(f"the local Ray came up on {node}, not on loopback; refusing to run on it")
    return reaper


def _reload_ray_config() -> None:
    """What Ray itself does when it turns token auth on (ray._private.authentication): re-read RAY_* settings
    and forget a token read before."""
    with contextlib.suppress(Exception):
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _session_dir(ray: Any) -> str:
    """The local Ray's session folder (its logs, sockets), or "" where Ray does not say."""
    with contextlib.suppress(Exception):
        return str(ray._private.worker._global_node.get_session_dir_path())
    return ""


def _ray_constants() -> Any:
    with contextlib.suppress(Exception):
        from ray._private import ray_constants

        return ray_constants
    return None


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1)."""
    try:
        addr = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return host == "localhost"
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


#: The reaper: waits for EOF on stdin (the driver ended, however), then ends every process of the
#: local Ray but the driver: those whose environment carries the session mark, and those with a
#: file of the session's folder open (Ray's agents overwrite their environment with their process
#: title; every Ray process writes its logs there). Standard library and psutil only.
REAPER_CODE = """
import os, signal, sys, time
import psutil
name, mark, folder, driver, grace = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
while sys.stdin.buffer.read(4096):
    pass
me, uid = os.getpid(), os.getuid()
def ours(proc):
    if proc.environ().get(name) == mark:
        return True
    return bool(folder) and any(f.path.startswith(folder) for f in proc.open_files())
def members():
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid not in (driver, me) and proc.uids().real == uid and ours(proc):
                found.append(proc)
        except (psutil.Error, OSError):
            pass
    return found
for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL, signal.SIGKILL):
    procs = members()
    if not procs:
        break
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=grace if sig == signal.SIGTERM else 1.0)
"""


class Reaper:
    """The process that ends a local Ray's leftovers once the driver is gone (see the module's docstring)."""

    def __init__(self, mark: str, session_dir: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != SESSION_MARK}
        folder = os.path.join(os.path.realpath(session_dir), "") if session_dir else ""
        self.proc = subprocess.Popen(
            [sys.executable, "-c", REAPER_CODE, SESSION_MARK, mark, folder, str(os.getpid()), str(REAP_GRACE_S)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True,  # a Ctrl-C or a kill of the driver's process group leaves it running
        )

    def release(self, wait_s: float = 3 * REAP_GRACE_S + 5) -> None:
        """Tell the reaper the driver is done with Ray (as its death would), and wait for its sweep."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=wait_s)


# ------------------------------------------------------------------------------- joining a cluster


def _join(ray: Any, address: str, quiet: dict[str, Any]) -> None:
    """ray.init(address=...) within about 20 s, or OrchestratorError with the reason in one line."""
    where = _host_port(address)
    if where is not None:  # nothing listening there: say so at once (Ray would retry for minutes)
        try:
            socket.create_connection(where, timeout=TCP_CHECK_TIMEOUT_S).close()
        except OSError as exc:
            why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc)).lower()
            raise OrchestratorError(f"cannot join the Ray cluster at {address}: {why}") from None
        if not _speaks_grpc(where):  # Ray's GCS (and the Ray client server) speak gRPC, over HTTP/2
            raise OrchestratorError(f"cannot join the Ray cluster at {address}: not a Ray cluster (the port answers "
                                    "but does not speak Ray's protocol, gRPC)")
    # Ray tries to reach the GCS this many times (about 1 + RAY_py_gcs_connect_timeout_s + 10 s
    # each) before it gives up; the default is 20 attempts, or 120 with RocksDB.
    attempts = "RAY_gcs_server_port_wait_time_s"
    saved = os.environ.get(attempts)
    os.environ.setdefault(attempts, "1")
    try:
        ray.init(address=address, **quiet)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError from Ray: one line
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "authentication token" in text.lower():
            text = ("it needs an authentication token (token auth is on): put the cluster's token in $RAY_AUTH_TOKEN "
                    "or in ~/.ray/auth_token ($RAY_AUTH_TOKEN_PATH names another file), or set RAY_AUTH_MODE=disabled "
                    "to join a cluster without tokens")
        raise OrchestratorError(f"cannot join the Ray cluster at {address}: {text}") from None
    finally:
        if saved is None:
            os.environ.pop(attempts, None)


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # and an empty SETTINGS


def _speaks_grpc(where: tuple[str, int], timeout: float = 3.0) -> bool:
    """Whether the server at `where` answers an HTTP/2 client preface with a SETTINGS frame, as any gRPC server does."""
    try:
        with socket.create_connection(where, timeout=timeout) as conn:
            conn.sendall(_HTTP2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = conn.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except OSError:
        return False
    return len(head) == 9 and head[3] == 4  # frame type 4: SETTINGS


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of `host:port`, `ray://host:port` or `[v6]:port`; None for `auto` or anything else."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


class Interrupts:
    """Ctrl-C during a search, kept even where Python drops the KeyboardInterrupt it raised.

    Python ignores an exception raised while a finalizer (`__del__`, a weakref callback) runs
    in the main thread ("Exception ignored in ..."), and Ray runs many there: a Ctrl-C that
    lands in one would be lost and the search would go on to its end. While `installed`, the
    SIGINT handler also remembers it, and `check()` (after Ray's start, and at every Tune
    step) raises it again.
    """

    def __init__(self) -> None:
        self.received = False

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if a Ctrl-C came, even one that was dropped."""
        if self.received:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupts]:
        """The handler, in the main thread and where SIGINT still has Python's default handler."""
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield self
            return
        signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
