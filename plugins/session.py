"""Built-in `ort-session` (stage `graph`): onnxruntime session settings, searched and carried by the model.

The settings (graph optimisation level, execution mode, and optionally thread counts) are
written into the model's metadata (`edge_orchestrator.session`); the agent reads them when it
creates its session (agents/kernel.py create_session), so the device measures the candidate with
them, and the picked `best.onnx` carries them to every device it is rolled out to (the run also
writes them next to it, as `best.session.json`). The graph itself is untouched. It runs after
every other graph technique of its pipeline.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from orchestrator import Choice, Technique, choice, hookimpl

#: The metadata key the agent reads (agents/kernel.py SESSION_METADATA).
KEY = "edge_orchestrator.session"


class SessionSettings(Technique):
    """onnxruntime session settings as searchable parameters, written into the model."""

    name = "ort-session"
    stage = "graph"
    version = "1"
    description = "onnxruntime session settings (graph optimisation level, execution mode, threads) carried by the model"
    search_space: ClassVar[dict[str, Choice]] = {
        "graph_optimization_level": choice(["all", "extended", "basic"]),
        "execution_mode": choice(["sequential", "parallel"]),
    }
    # None: the profile's runtime threads
    defaults: ClassVar[dict[str, Any]] = {"intra_op_threads": None, "inter_op_threads": None}

    def invalid(self, params: dict[str, Any]) -> str | None:
        """Thread counts are None (the profile's) or integers from 0 (onnxruntime's default) to 1024."""
        for key in ("intra_op_threads", "inter_op_threads"):
            value = params.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1024):
                return f"{key} must be empty (the profile's) or an integer from 0 to 1024, got {value!r}"
        return None

    def apply(self, model: Any, params: dict[str, Any], ctx: Any) -> Any:
        """A copy of the onnx.ModelProto with the settings in its metadata (replacing any earlier ones)."""
        import copy

        out = copy.deepcopy(model)
        settings = {k: v for k, v in params.items() if v is not None}
        kept = [p for p in out.metadata_props if p.key != KEY]
        del out.metadata_props[:]
        out.metadata_props.extend(kept)
        entry = out.metadata_props.add()
        entry.key, entry.value = KEY, json.dumps(settings, sort_keys=True)
        return out


@hookimpl
def register_techniques(register):
    """Register `ort-session`."""
    register(SessionSettings())
