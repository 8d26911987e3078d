"""The server process: settings, command line, logging, assembly and the container health probe."""
