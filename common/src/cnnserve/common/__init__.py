"""cnnserve: train CNNs, export them to ONNX, serve them over gRPC on ONNX Runtime.

The subpackages are installed from the project's top-level folders:
``cnnserve.training`` (torch; extra ``train``), ``cnnserve.server`` (onnxruntime, grpcio;
extra ``serve``), ``cnnserve.client`` (grpcio, numpy; extra ``client``) and
``cnnserve.proto`` (the generated gRPC stubs).
"""

from __future__ import annotations

__version__ = "0.1.0"
