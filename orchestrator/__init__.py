"""edge-orchestrator: find, measure and roll out the best compressed model per edge-device profile.

The public plugin API is what this module exports.
"""

from orchestrator.api import Choice, Dataset, Task, Technique, TechniqueContext, choice, hookimpl

__version__ = "0.1.0"

__all__ = ["Choice", "Dataset", "Task", "Technique", "TechniqueContext", "choice", "hookimpl", "__version__"]
