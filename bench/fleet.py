"""A fleet for the benches (and the rollout tests): real sshd devices on loopback, and finished run records.

A run is recorded the way `orchestrate --profile` records one: RunStore.start_run, then
orchestrator.run.finish_run (selection, results.json, best.onnx, report.html), with the model in
the model cache under its sha256.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.sshd import Sshd


def make_run(profile_path: Path, model: bytes, out_root: Path, latency_ms: float = 0.1) -> str:
    """A finished run of the profile whose one candidate (the baseline) is `model`; returns the run id.

    With `latency_ms` over the profile's limit, the run ends `no_feasible`, with no chosen model.
    """
    from orchestrator.config.profile import load_profile
    from orchestrator.run import finish_run, new_run_id
    from orchestrator.search.record import CandidateRecord
    from orchestrator.state.paths import cache_dir, store_path
    from orchestrator.state.store import RunStore

    loaded = load_profile(profile_path)
    sha = hashlib.sha256(model).hexdigest()
    (cache_dir("models") / f"{sha}.onnx").write_bytes(model)
    run_id = new_run_id(loaded.profile.name)
    out = out_root / run_id
    out.mkdir(parents=True)
    store = RunStore(store_path())
    store.start_run(run_id, loaded.profile.name, str(loaded.path), "digits", str(out))
    record = {"id": "c000", "pipeline": [], "status": "ok", "error": None, "device": "local:test", "model_sha256": sha,
              "metrics": {"accuracy": 0.9, "size_bytes": len(model), "compressed_size_bytes": len(model),
                          "latency_ms": {"p50": latency_ms, "p90": latency_ms, "p99": latency_ms},
                          "peak_memory_mb": 50.0, "model_memory_mb": 1.0, "energy_mj": 0.1,
                          "energy_source": "estimated"}}
    device = {"name": "local:test", "arch": "x86_64", "transport": "local", "emulated": False, "pinned_cpu": None,
              "source": "fallback", "note": "test run", "devices": [], "unreachable": []}
    finish_run(store, run_id, loaded, "digits", device, [CandidateRecord.from_json(record)], out, "finished", None)
    return run_id


@dataclass
class Fleet:
    """Real sshd devices on loopback, each with its own folder as its disk, registered in one profile."""

    profile: Path
    servers: dict[str, Sshd] = field(default_factory=dict)

    def disk(self, name: str) -> Path:
        """The device's remote folder (its agent, its deploy/ folder)."""
        return self.servers[name].folder / "disk"

    def current(self, name: str) -> str | None:
        """The version `current` points to on the device, read from its disk."""
        link = self.disk(name) / "deploy" / "current"
        return Path(link.readlink()).name if link.is_symlink() else None

    def stop(self) -> None:
        """Stop every sshd."""
        for server in self.servers.values():
            server.stop()


def start_fleet(folder: Path, profile: Path, count: int, prefix: str = "dev", canary_tag: bool = False,
                server_factory=Sshd) -> Fleet:
    """Start `count` sshd on 127.0.0.1 and register each as a device of `profile` (host key pinned by fingerprint)."""
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.fleet.registration import Registration, register_device

    fleet = Fleet(profile)
    try:
        for i in range(count):
            fleet.servers[f"{prefix}-{i}"] = server_factory(folder / f"{prefix}-{i}").start()

        def register(item: tuple[int, str]) -> None:
            i, name = item
            server = fleet.servers[name]
            register_device(Registration(
                name=name, host=getattr(server, "address", "127.0.0.1"), port=server.port, user=server.user,
                key_path=str(server.client_key), profile_path=str(profile), python=sys.executable,
                remote_dir=str(server.folder / "disk"), host_key_fingerprint=server.host_key_fingerprint,
                tags=["canary"] if canary_tag and i == count - 1 else [], connect_timeout_s=5.0), lambda q: True)

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(register, enumerate(fleet.servers)))
    except BaseException:
        fleet.stop()
        raise
    return fleet
