"""cnnserve.server."""
