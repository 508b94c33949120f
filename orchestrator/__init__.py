"""edge-orchestrator: find, measure and roll out the best compressed model per edge-device profile.

The public plugin API is what this module exports.
"""

from importlib.metadata import PackageNotFoundError, version

from orchestrator.api import (
    Choice,
    Dataset,
    DeviceFacts,
    Task,
    Technique,
    TechniqueContext,
    TensorSpec,
    choice,
    distillation_loss,
    hookimpl,
)
from orchestrator.errors import TechniqueParamsError
from orchestrator.search.record import CandidateRecord

try:
    __version__ = version("edge-orchestrator")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["CandidateRecord", "Choice", "Dataset", "DeviceFacts", "Task", "Technique", "TechniqueContext", "TechniqueParamsError", "TensorSpec",
           "choice", "distillation_loss", "hookimpl", "__version__"]
