"""Hook specifications: the contract between edge-orchestrator and its plugins.

Hooks only ever gain arguments; a plugin's implementation may accept any subset.
Plugins are found through the entry-point group ``edge_orchestrator``.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

from orchestrator.api import PROJECT_NAME

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


@hookspec
def register_techniques(register: Callable[[Any], None]) -> None:
    """Register compression techniques.

    :param register: call it once per technique with a ``Technique`` instance.
        A name already registered by another plugin is refused, naming both plugins.
    :returns: nothing.

    Called once when the plugin manager is built. Added in 0.1.
    """


@hookspec
def register_tasks(register: Callable[[Any], None]) -> None:
    """Register tasks: a model family with its training, calibration and evaluation data and metric.

    :param register: call it once per task with a ``Task`` instance.
    :returns: nothing.

    Called once when the plugin manager is built. Added in 0.1.
    """


@hookspec
def candidate_measured(run_id: str, candidate: dict) -> None:
    """Called on the host after each candidate has been evaluated and measured (or has failed).

    :param run_id: the run the candidate belongs to.
    :param candidate: the candidate record as written to results.json.
    :returns: nothing. An exception here is logged and does not stop the run.

    Added in 0.1.
    """


@hookspec
def run_finished(run_id: str, results: dict) -> None:
    """Called once at the end of a run, after results.json is written.

    :param run_id: the run.
    :param results: the whole results.json content.
    :returns: nothing. An exception here is logged and does not stop the run.

    Added in 0.1.
    """
