"""The gRPC wire layer: servicer, messages, codec, validation, health, interceptors."""
