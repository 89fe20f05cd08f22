"""How the daemon writes its log: a line for people (the default), or one JSON object a line.

``serve --log-format json`` is for journald and log shippers (Vector, Fluent Bit, Loki's
promtail): every line is an object with ``time`` (RFC 3339, UTC), ``level``, ``message`` and
``pid``, plus ``model`` and ``generation`` where the line is about one (call sites pass them
with ``extra={"model": ..., "generation": ...}``), and ``error`` with the traceback of a logged
exception. Nothing else of the record goes out: no paths of the daemon's source files.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

HUMAN = "%(asctime)s weightd[%(process)d] %(levelname)s %(message)s"
FIELDS = ("model", "generation")  # what call sites may add with extra=


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        # default=str: an extra= value json cannot encode must not cost the line
        return json.dumps(line, default=str)


def configure(level: str = "info", format: str = "human") -> None:
    """Send the daemon's log to stderr, ``format`` "human" or "json", from ``level`` up.

    As ``logging.basicConfig``: nothing changes where logging was set up already (a test
    runner that calls the command in its own process keeps its handlers).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else logging.Formatter(HUMAN))
    logging.basicConfig(level=level.upper(), handlers=[handler])
