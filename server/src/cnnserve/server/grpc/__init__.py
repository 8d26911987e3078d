"""The gRPC wire layer: servicer, streaming, the shared inference path, messages, codec,
validation, encoded images, health, interceptors."""
