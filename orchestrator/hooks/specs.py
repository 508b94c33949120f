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
def register_transports(register: Callable[[Any], None]) -> None:
    """Register device transport kinds: a new way to reach a device (a serial board, a container, a device farm).

    :param register: call it once per kind with a ``TransportKind`` instance. A name already
        registered (a built-in's: local, ssh, qemu, or another plugin's) is refused, naming both.
    :returns: nothing.

    A device whose ``transport`` is the kind's name is measured through ``kind.transport(device)``
    and, when the kind has ``deploy``, rolled out to through ``kind.deploy(device, ...)``.
    Called once when the plugin manager is built. Added in 0.4.
    """


@hookspec
def run_started(run_id: str, run: dict) -> None:
    """Called on the host when a run (or a resumed run) starts, before the base model is loaded.

    :param run_id: the run.
    :param run: ``out`` (the run's folder), ``profile`` (its name), ``space`` (candidates in the
        search space), ``trials`` (trials this run will do), ``resumed`` (candidates kept from an
        interrupted run, or None).
    :returns: nothing. An exception here is logged and does not stop the run.

    Added in 0.2.
    """


@hookspec
def devices_chosen(run_id: str, devices: dict) -> None:
    """Called once the devices of the run are chosen (registered, emulated or the local fallback).

    :param run_id: the run.
    :param devices: what results.json says under ``device``: ``note`` (one line saying which
        devices and why), ``source``, ``devices``, ``unreachable`` (devices skipped, with reasons).
    :returns: nothing. An exception here is logged and does not stop the run.

    Added in 0.2.
    """


@hookspec
def base_model_started(run_id: str, task: str) -> None:
    """Called when the task's base model is being loaded (trained on first use, then cached).

    :param run_id: the run.
    :param task: the task's name.
    :returns: nothing. An exception here is logged and does not stop the run.

    Added in 0.2.
    """


@hookspec
def base_model_progress(run_id: str, task: str, epoch: int, epochs: int, elapsed_s: float,
                        left_s: float | None) -> None:
    """Called after each epoch while the base model is trained (first use only), when the task reports it
    (its ``train()`` calls ``orchestrator.training_progress(done, total)``; the built-in tasks do).

    :param run_id: the run.
    :param task: the task's name.
    :param epoch: epochs done so far (1 after the first).
    :param epochs: epochs in all.
    :param elapsed_s: seconds of training so far.
    :param left_s: an estimate of the seconds left (elapsed per epoch times epochs left); None before one ends.
    :returns: nothing. An exception here is logged and does not stop the run.

    Added in 0.5.
    """


@hookspec
def base_model_ready(run_id: str, accuracy: float, trained_now: bool, quality_metric: str,
                     quality_compares: str) -> None:
    """Called when the base model is ready, before the search starts.

    :param run_id: the run.
    :param accuracy: its accuracy (quality) on the held-out split.
    :param trained_now: True when it was trained for this run, False when it came from the cache.
    :param quality_metric: what `accuracy` measures, here and in every candidate's metrics:
        "accuracy" (a task's), or for a model brought with --model "labels", "top1", "cosine",
        "detection", "segmentation", "relative_error" (docs/own_models.md). Added in 0.3; a hook may leave it out.
    :param quality_compares: which parts of the outputs the quality compares, in words (e.g. "output0
        (22 channels, each standardised by fp32's mean and spread)"); "" for a task's own metric.
        Added in 0.4; a hook may leave it out.
    :returns: nothing. An exception here is logged and does not stop the run.

    Added in 0.2.
    """


@hookspec
def final_round_started(run_id: str, finalists: list, rounds: int) -> None:
    """Called after the search, when the finalists and the baseline are measured again, together.

    :param run_id: the run.
    :param finalists: the candidate ids measured in the final round (the baseline last).
    :param rounds: the interleaved rounds asked for (a time budget may end them earlier).
    :returns: nothing. An exception here is logged and does not stop the run.

    Added in 0.2.
    """


@hookspec
def family_ruled_out(run_id: str, family: dict) -> None:
    """Called when the search stops proposing a technique, or one value of a technique's parameter, whose
    candidates keep being rejected for quality or failing with the same cause (docs/scaling.md).

    :param run_id: the run.
    :param family: the entry results.json lists under ``ruled_out``: ``family`` (its name:
        ``int8-static``, ``int8-static(calibration=entropy)``), ``technique``, ``params``,
        ``reason`` (``quality`` or ``failure``), ``message`` (one line saying so), the counts
        (``finished``, ``rejected`` or ``failed``, ``after_trials``) and ``quality`` (the rejected
        members' lowest and highest figure) or ``cause`` (the failure's first line).
    :returns: nothing. An exception here is logged and does not stop the run.

    Added in 0.4.
    """


@hookspec
def candidate_measured(run_id: str, candidate: dict) -> None:
    """Called on the host after each candidate has been evaluated and measured (or has failed).

    :param run_id: the run the candidate belongs to.
    :param candidate: the candidate record as written to results.json (the plugin's own copy;
        `orchestrator.CandidateRecord.from_json` reads it typed).
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
