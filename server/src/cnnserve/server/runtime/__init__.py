"""ONNX Runtime: one session per loaded model version (the only layer that imports onnxruntime)."""
