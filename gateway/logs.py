"""JSON log lines on stdout: one per request, plus warnings from the background workers.

Callers pass only fields that are safe to log; nothing here ever sees a credential, a
prompt or a webhook secret.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
from typing import Any, TextIO

import orjson

ACCESS_LOGGER = "gateway.access"
PIPE_BUF = 4096  # a write up to this size reaches a pipe whole (POSIX)


def utc_stamp(t: float) -> str:
    """`YYYY-MM-DDTHH:MM:SS.mmmZ`, the `time` of every log line; strftime once a second."""
    second = int(t)
    return f"{_second_stamp(second)}.{int((t - second) * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _second_stamp(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": utc_stamp(record.created),
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


class AccessLog:
    """The one line per request, in the same JSON shape as `JSONFormatter`'s, without the
    logging module's per-record work: a LogRecord, the handler's lock and one write per
    line were a measurable share of a create's CPU (docs/benchmarks.md). The lines of one event-loop
    turn go out together at its end, in writes of at most PIPE_BUF bytes cut at line ends,
    so lines of workers sharing a pipe never interleave. Obeys the `gateway.access`
    logger's level like any other line."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._logger = logging.getLogger(ACCESS_LOGGER)
        self._lines: list[bytes] = []

    def write(self, fields: dict[str, Any]) -> None:
        if not self._logger.isEnabledFor(logging.INFO):
            return
        head = {"time": utc_stamp(time.time()), "level": "info", "logger": ACCESS_LOGGER}
        self._lines.append(orjson.dumps(head | fields, option=orjson.OPT_APPEND_NEWLINE))
        if len(self._lines) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop: nothing will flush later
                self.flush()

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        chunk = b""
        for line in lines:
            if chunk and len(chunk) + len(line) > PIPE_BUF:
                self._emit(chunk)
                chunk = b""
            chunk += line
        if chunk:
            self._emit(chunk)

    def _emit(self, chunk: bytes) -> None:
        self._stream.write(chunk.decode())
        self._stream.flush()
