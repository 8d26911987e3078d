"""Logging set-up for the server process: called once, from ``main()``.

``text`` writes the usual one-line records; ``json`` writes one JSON object per line (built
with ``json.dumps``, so messages with quotes or newlines stay valid JSON) for log shippers.
Fields a caller passes with ``extra={...}`` are added to the JSON object.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message",
                                                                            "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC ISO 8601), level, logger, message, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send records at ``level`` and above to stderr as ``fmt`` ("text" or "json").

    Replaces any handlers installed before (the ``cnnserve`` entry point installs a default
    one before it knows the settings). Raises ValueError for an unknown ``fmt``.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif fmt == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    logging.basicConfig(level=level, handlers=[handler], force=True)
