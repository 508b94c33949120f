"""Built-in `ort-session` (stage `graph`): onnxruntime session settings, searched and carried by the model.

The settings (graph optimisation level, execution mode, denormals flushed to zero, and
optionally thread counts) are written into the model's metadata (`edge_orchestrator.session`);
the agent reads them when it creates its session (agents/kernel.py create_session), so the
device measures the candidate with them, and the picked `best.onnx` carries them to every
device it is rolled out to (the run also writes them next to it, as `best.session.json`). The
graph itself is untouched. It runs after every other graph technique of its pipeline.
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
    description = ("onnxruntime session settings (graph optimisation level, execution mode, denormals flushed, "
                   "threads) carried by the model")
    search_space: ClassVar[dict[str, Choice]] = {
        "graph_optimization_level": choice(["all", "extended", "basic"]),
        "execution_mode": choice(["sequential", "parallel"]),
        # onnxruntime's session.set_denormal_as_zero (flush-to-zero + denormals-are-zero), which the
        # agent applies on its own thread too (agents/kernel.py): a masked attention's softmax
        # underflows through denormals, ~10x slower on x86-64 without it
        "denormal_as_zero": choice([False, True]),
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

    def recommended(self, device: Any) -> list[dict[str, Any]]:
        """Denormals flushed for a MatMul model (a transformer) on a CPU the agent can flush on.

        An attention mask adds float-min to the padded scores, and softmax's exp() of those
        underflows through denormal numbers: 1.1 ms instead of 0.08 ms per 12x128x128 softmax on
        an x86-64 core (docs/own_models.md). Flushing them changes values below 1e-38 only.
        """
        if device.gpu or not device.matmul_model or not (device.x86 or device.arm):
            return []
        return [{"graph_optimization_level": "all", "execution_mode": "sequential", "denormal_as_zero": True}]

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
