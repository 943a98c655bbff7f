"""`SIGHUP`: re-read the config file in this worker without dropping a request.

The new file is loaded and validated whole; any problem refuses it whole (the old config
stays, each problem logged as `check-config` prints it). A valid file replaces the
directory's config part in one swap (`Services.reconfigure`): tenants, keys, limits,
policy, pricing, relays (added, changed, drained with `enabled = false`), admin keys and
webhook settings apply from the next request. A file that removes a relay with active
tasks is refused whole, naming the relay and how many (`orphaned_relays`). Settings read
once at start (the store URL, the [server] section but public_url) are named in a warning
and wait for a restart.

One reload, one audit entry, however many workers. With `serve --workers N` the supervisor
relays SIGHUP to every worker and each reloads on its own (each has its own directory), so
each would write an entry. Instead the supervisor names each reload first: it appends a
numbered fresh audit id to a file of this start (`announce_reload`, path in
GATEWAY_RELOAD_ID_FILE; the file is replaced whole, so a reader never sees half of it) and
then sends every worker `RELAY_SIGNAL` (SIGUSR1); every worker writes its entry under that
id, and the store keeps the first (`Store.append_audit` is idempotent by id, atomically).
Every worker still writes, so the entry is there as long as one of them reloaded.

The kernel keeps at most one pending signal of a kind: two SIGHUPs close together reach the
supervisor as two, but its two relays to a busy worker can arrive as one. So a relay is
not "one reload" but "reload for every id announced since the last": the worker takes all
the ids it has not taken yet (`ReloadIds.announced`), reloads once and writes an entry for
each, and a relay that finds none (its id was taken by the one before) does nothing. A
SIGHUP sent straight to one worker, not through the supervisor, is a reload of its own
with a fresh id, as in a single-process gateway. Should the workers disagree (the file
changed while they read it), the entry has the first writer's result; each worker's log
has its own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
from collections.abc import Sequence
from pathlib import Path

from gateway.config import Config, ConfigError, config_warnings, load_config
from gateway.keygen import new_audit_id
from gateway.services import Services
from gateway.store.base import AuditEntry

logger = logging.getLogger("gateway.config")
RELAY_SIGNAL = signal.SIGUSR1  # the supervisor's "reload for the ids announced" to its workers
LIVE_SERVER_SETTINGS = {"public_url"}  # read per request through the config
RELOAD_ID_ENV = "GATEWAY_RELOAD_ID_FILE"  # set by `serve --workers N` for its workers
AUDIT_ID_RE = re.compile(r"aud_[0-9a-f]{24}")


ANNOUNCED_KEPT = 64  # announced ids the file keeps: far more than signals a worker can lag


def announce_reload(path: str, now: float) -> str:
    """The supervisor's side: a fresh audit id for this reload, numbered one past the last
    and added to the file every worker reads (the file replaced atomically: a worker never
    reads half of it). Call before signalling the workers."""
    reload_id = new_audit_id(now)
    announced = _read_announced(path)
    seq = announced[-1][0] + 1 if announced else 1
    lines = [f"{n} {i}" for n, i in [*announced, (seq, reload_id)][-ANNOUNCED_KEPT:]]
    partial = f"{path}.{os.getpid()}.partial"
    Path(partial).write_text("\n".join(lines) + "\n", encoding="ascii")
    os.replace(partial, path)
    return reload_id


class ReloadIds:
    """A worker's side: the audit ids the supervisor announced that this worker has not
    taken yet, each taken once."""

    def __init__(self, path: str | None):
        self.path = path
        announced = _read_announced(path) if path else []
        self._taken = announced[-1][0] if announced else 0  # announced before this worker started: not ours

    @classmethod
    def from_env(cls) -> ReloadIds:
        return cls(os.environ.get(RELOAD_ID_ENV) or None)

    def announced(self) -> list[str]:
        """Every id announced since the last call (oldest first); [] when there is none."""
        if self.path is None:
            return []
        fresh = [(seq, reload_id) for seq, reload_id in _read_announced(self.path) if seq > self._taken]
        if fresh:
            self._taken = fresh[-1][0]
        return [reload_id for _, reload_id in fresh]


def _read_announced(path: str) -> list[tuple[int, str]]:
    """The file's (number, audit id) lines in order; [] before the first announcement (or
    when unreadable: a fresh id then)."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return []
    announced = []
    for line in text.splitlines():
        seq, _, reload_id = line.partition(" ")
        if seq.isdigit() and AUDIT_ID_RE.fullmatch(reload_id):
            announced.append((int(seq), reload_id))
    return announced


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The settings that differ but only take effect at the next start."""
    changed = [f"store.{f.name}" for f in dataclasses.fields(old.store) if _differs(old.store, new.store, f.name)]
    changed += [
        f"server.{f.name}"
        for f in dataclasses.fields(old.server)
        if f.name not in LIVE_SERVER_SETTINGS and _differs(old.server, new.server, f.name)
    ]
    return changed


def _differs(old: object, new: object, name: str) -> bool:
    return bool(getattr(old, name) != getattr(new, name))


async def reload_config(services: Services, path: str, audit_ids: Sequence[str] = ()) -> bool:
    """Load, validate and apply `path`; count and audit the result: an entry under each of
    `audit_ids` (the supervisor's, shared by the workers of each reload), or under a fresh
    id when there are none. True when applied."""
    old = services.config
    problems: list[str] = []
    try:
        new = load_config(path)
        problems = await orphaned_relays(services, old, new)
        if not problems:
            services.reconfigure(new)
    except ConfigError as err:
        problems = err.problems
    except OSError as err:  # the JWT public key file could not be read
        problems = [f"auth.jwt.public_key_file: {err.strerror or err}"]
    if problems:
        for problem in problems:
            logger.error("config reload refused: %s", problem)
    else:
        for name in restart_only_changes(old, new):
            logger.warning("config reload: %s changed but takes effect only at the next restart", name)
        for warning in config_warnings(new):
            logger.warning(warning)
        logger.info("config reloaded from %s", path)
    result = "error" if problems else "ok"
    services.metrics.count(services.metrics.config_reloads, (result,))
    for audit_id in audit_ids or [new_audit_id(services.clock())]:
        await _audit(services, result, len(problems), audit_id)
    return not problems


async def orphaned_relays(services: Services, old: Config, new: Config) -> list[str]:
    """A relay the new file removes while it still has active tasks would orphan them
    (their polls and downloads go to their own relay): one problem per such relay, which
    refuses the reload whole. Tasks recorded before relays had ids are the first relay's."""
    kept = {relay.id for relay in new.relay_list}
    removed = [relay.id for relay in old.relay_list if relay.id not in kept]
    if not removed:
        return []
    try:
        active = await services.store.active_by_relay()
    except Exception as exc:
        return [f"relays: could not count the active tasks of removed relay(s) {', '.join(removed)} ({exc})"]
    counts: dict[str, int] = {}
    for relay, n in active.items():
        owner = relay or old.relay_list[0].id
        counts[owner] = counts.get(owner, 0) + n
    return [
        f"relays: removing relay {relay!r} would orphan its {counts[relay]} active task(s);"
        " drain it first (enabled = false), then remove it once its tasks have finished"
        for relay in removed
        if counts.get(relay)
    ]


async def _audit(services: Services, result: str, problems: int, audit_id: str) -> None:
    """The reload's entry; the workers of one reload share its id, so the store keeps one."""
    now = services.clock()
    entry = AuditEntry(
        id=audit_id,
        time=now,
        actor_type="config",
        actor_id="sighup",
        action="config.reload",
        changes={"result": result, "problems": problems},
    )
    try:
        await services.store.append_audit(entry)
    except Exception:
        logger.exception("config reload: the audit entry could not be written")
