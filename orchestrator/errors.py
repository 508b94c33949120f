"""Typed errors. Library code raises these; only the CLI turns them into one line and an exit code."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of `orchestrate`: each one means one thing."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NO_FEASIBLE_CANDIDATE = 3
    NO_DEVICE_REACHABLE = 4
    INTERRUPTED = 130
    TERMINATED = 143  # SIGTERM (128 + 15), handled as Ctrl-C is


class OrchestratorError(Exception):
    """Base of every error the CLI reports as one clear line."""

    exit_code: ExitCode = ExitCode.ERROR


class ProfileError(OrchestratorError):
    """A device profile is missing, is not YAML, or does not validate.

    The message is already shaped `FILE:LINE: field.path: message`.
    """

    exit_code = ExitCode.USAGE


class PluginError(OrchestratorError):
    """A plugin is broken, duplicates a name, or a name asked for is not installed."""

    exit_code = ExitCode.USAGE


class TechniqueParamsError(OrchestratorError):
    """A technique was given parameters it does not accept (checked before any work starts)."""

    exit_code = ExitCode.USAGE


class NoFeasibleCandidate(OrchestratorError):
    """Every candidate broke at least one of the profile's constraints."""

    exit_code = ExitCode.NO_FEASIBLE_CANDIDATE


class DeviceUnreachable(OrchestratorError):
    """No device of the profile could be reached."""

    exit_code = ExitCode.NO_DEVICE_REACHABLE


class BaselineError(OrchestratorError):
    """The base model cannot be loaded, exported or evaluated: the run stops before any trial."""


class MeasurementError(OrchestratorError):
    """The agent could not measure a candidate on a device (the candidate fails, the run goes on)."""


class RunNotFound(OrchestratorError):
    """A run id that the run store does not know."""

    exit_code = ExitCode.USAGE


class DeviceNotFound(OrchestratorError):
    """A device name that the device registry does not know."""

    exit_code = ExitCode.USAGE


class DeviceRefused(OrchestratorError):
    """A device cannot be registered: it does not fit its profile, its agent cannot run, or the name is taken."""


class HostKeyMismatch(OrchestratorError):
    """A device offered a host key other than the one pinned (or given) for it: the connection is refused."""


class DeviceOffline(MeasurementError):
    """A device could not be reached after reconnecting with back-off; it is marked offline."""


class ConnectionLost(MeasurementError):
    """The connection to a device dropped while a command ran on it."""


class InventoryError(OrchestratorError):
    """An inventory file that cannot be read as an Ansible-style YAML inventory, or a host in it without a profile."""

    exit_code = ExitCode.USAGE


class RunNotResumable(OrchestratorError):
    """`--resume` on a run that finished, that another process still runs, or whose profile changed since."""

    exit_code = ExitCode.USAGE


class DeployError(OrchestratorError):
    """A rollout cannot start or go on: the run has no chosen model, its model file is missing or
    altered, a profile has no registered device, no rollout to resume, conflicting options."""


class RolloutFailed(OrchestratorError):
    """A rollout stopped: a device failed its health check or its install (the failed devices were rolled back)."""


class RolloutIncomplete(OrchestratorError):
    """A rollout left devices that were offline (or lost mid-install) for `orchestrate deploy --resume`."""

    exit_code = ExitCode.NO_DEVICE_REACHABLE


class EmulationUnavailable(OrchestratorError):
    """An emulated device cannot be made: no emulation section, QEMU missing, the sysroot cannot be built."""


class StateFileError(OrchestratorError):
    """A file we keep state in is not what it should be: the state folder is a file, `runs.sqlite` or
    `registry.sqlite` is not an SQLite database, a run's results.json does not have the shape we write."""

    exit_code = ExitCode.USAGE


class DiskFull(OrchestratorError):
    """A run's folder (or the state folder) has no space left: the run is marked failed, in one line naming it."""


class StoreLocked(OrchestratorError):
    """`runs.sqlite` or `registry.sqlite` stayed locked by another process for longer than the busy timeout."""


class ModelSourceError(OrchestratorError):
    """A model given with --model (or the profile's `model:`) cannot be used: one line saying why."""

    exit_code = ExitCode.USAGE
