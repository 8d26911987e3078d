"""The protocol-neutral engine: the repository on disk, which versions serve, their states."""
