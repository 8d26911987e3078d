"""cnnserve.client."""
