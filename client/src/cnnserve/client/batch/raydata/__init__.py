"""The batch job on Ray Data (``cnnserve batch --engine ray``): blocks, actors, resume.

Imported only when that engine runs: ``ray`` (the ``batch-ray`` extra) is optional, and
ONNX Runtime is imported inside the actors only.
"""
