"""The cnnserve test suite, laid out like the source (common, server, client, training, ...)."""
