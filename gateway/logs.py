"""JSON log lines on stdout: one per request, plus warnings from the background workers.

Callers pass only fields that are safe to log; nothing here ever sees a credential, a
prompt or a webhook secret.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

ACCESS_LOGGER = "gateway.access"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = record.exc_info[0].__name__
        return orjson.dumps(line).decode()


def setup_logging(level: str) -> None:
    """JSON on stdout for the gateway's loggers and uvicorn's error log; uvicorn's own
    access log is off (the gateway writes its own line per request)."""
    # No line needs the caller's file, thread or process: LogRecord skips those lookups.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


def log_fields(logger: logging.Logger, level: int, fields: dict[str, Any]) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, "", extra={"fields": fields})
