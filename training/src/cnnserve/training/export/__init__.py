"""Export: a checkpoint becomes a verified ONNX version in the model repository."""
