"""edge-orchestrator: find, measure and roll out the best compressed model per edge-device profile.

The public plugin API is what this module exports.
"""

from importlib.metadata import PackageNotFoundError, version

from orchestrator.api import (
    Choice,
    Dataset,
    DeviceFacts,
    NotApplicable,
    Task,
    Technique,
    TechniqueContext,
    TensorSpec,
    choice,
    distillation_loss,
    hookimpl,
    training_progress,
)
from orchestrator.devices.base import (Device, EmulatedTarget, LocalTarget, PluginTarget, SshTarget, bench_args,
                                       compare_args)
from orchestrator.devices.transport import Deployable, Transport, TransportKind
from orchestrator.errors import DeviceUnreachable, MeasurementError, TechniqueParamsError
from orchestrator.models.training import TrainingRun, train_epochs
from orchestrator.search.record import CandidateRecord

try:
    __version__ = version("edge-orchestrator")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["CandidateRecord", "Choice", "Dataset", "Deployable", "Device", "DeviceFacts", "DeviceUnreachable",
           "EmulatedTarget", "LocalTarget", "MeasurementError", "NotApplicable", "PluginTarget", "SshTarget", "Task", "Technique",
           "TechniqueContext", "TechniqueParamsError", "TensorSpec", "TrainingRun", "Transport", "TransportKind",
           "bench_args", "choice", "compare_args", "distillation_loss", "hookimpl", "train_epochs",
           "training_progress", "__version__"]
