"""On-device measurement agent (runs on the edge device with only Python 3.9+, numpy and onnxruntime).

Modules, each importing only those below it (tests/test_agent_imports.py checks there is no cycle):

- ``cli``: the command line (``python -m agents ...``), one JSON object out;
- ``benchmark``: ``bench`` and ``run``; ``compare``: models in interleaved rounds; ``info``: ``info``, ``sha256``;
- ``deploy`` -> ``health`` -> ``versions``: the rollout's commands, the health check, the deploy folder;
- ``sensors/``: energy sensors, one module per family;
- ``kernel``: exit codes, errors, sha256, model inputs, latency statistics, onnxruntime sessions.
"""
