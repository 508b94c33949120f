"""On-device measurement agent (runs on the edge device with only Python 3.9+, numpy and onnxruntime)."""
