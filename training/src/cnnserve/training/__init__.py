"""cnnserve.training."""
