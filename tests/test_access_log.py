"""The access log: one JSON line per request, in the logging module's JSON shape, written
per event-loop turn in pipe-atomic chunks (workers sharing a pipe never split a line)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from gateway.logs import ACCESS_LOGGER, PIPE_BUF, AccessLog


class Recorder(io.StringIO):
    """A stream that remembers each flushed write, as the kernel would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self._pending = ""

    def write(self, s: str) -> int:
        self._pending += s
        return len(s)

    def flush(self) -> None:
        if self._pending:
            self.writes.append(self._pending)
            self._pending = ""


@pytest.fixture
def access_level() -> Iterator[logging.Logger]:
    logger = logging.getLogger(ACCESS_LOGGER)
    before = logger.level
    logger.setLevel(logging.INFO)
    yield logger
    logger.setLevel(before)


async def test_lines_of_a_turn_go_out_together_in_pipe_atomic_writes(access_level: logging.Logger) -> None:
    out = Recorder()
    log = AccessLog(out)
    for i in range(60):
        log.write({"request_id": f"req_{i:03d}", "route": "/runway/tasks", "status": 200, "pad": "x" * 150})
    assert out.writes == []  # nothing yet: the turn has not ended
    await asyncio.sleep(0)
    assert len(out.writes) > 1 and all(len(w.encode()) <= PIPE_BUF and w.endswith("\n") for w in out.writes)
    lines = "".join(out.writes).splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == [f"req_{i:03d}" for i in range(60)]


async def test_a_line_has_the_shape_of_every_other_log_line(access_level: logging.Logger) -> None:
    out = Recorder()
    log = AccessLog(out)
    log.write({"request_id": "req_1", "status": 429, "tenant": None})
    await asyncio.sleep(0)
    [line] = out.writes
    entry = json.loads(line)
    assert list(entry)[:3] == ["time", "level", "logger"]
    assert entry["level"] == "info" and entry["logger"] == ACCESS_LOGGER
    assert entry["status"] == 429 and entry["tenant"] is None
    assert len(entry["time"]) == 24 and entry["time"].endswith("Z") and entry["time"][10] == "T"


async def test_the_loggers_level_turns_it_off(access_level: logging.Logger) -> None:
    out = Recorder()
    access_level.setLevel(logging.WARNING)
    AccessLog(out).write({"request_id": "req_1"})
    await asyncio.sleep(0)
    assert out.writes == []


def test_without_an_event_loop_a_line_is_written_at_once(access_level: logging.Logger) -> None:
    out = Recorder()
    AccessLog(out).write({"request_id": "req_1"})
    assert len(out.writes) == 1 and json.loads(out.writes[0])["request_id"] == "req_1"
