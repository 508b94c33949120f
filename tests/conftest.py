"""Test session setup: a private state folder, and one real local Ray shared by the tests that need it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def state_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests never touch the user's real state: EDGE_ORCHESTRATOR_HOME points at a session folder."""
    home = tmp_path_factory.mktemp("eo-home")
    os.environ["EDGE_ORCHESTRATOR_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session (2 CPUs, no dashboard), shut down at the end."""
    from orchestrator import search  # noqa: F401  (sets Ray's quiet environment first)
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()
