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
passes SIGHUP on to every worker and each reloads on its own (each has its own directory),
so each would write an entry. Instead the supervisor names the reload first: it writes a
fresh audit id to a file of this start (`announce_reload`, path in GATEWAY_RELOAD_ID_FILE)
and then signals the workers; every worker writes its entry under that id, and the store
keeps the first (`Store.append_audit` is idempotent by id, atomically). Every worker still
writes, so the entry is there as long as one of them reloaded. A single-process gateway
has no such file and takes a fresh id per signal. A worker takes the file's id only when it
is new to it (`ReloadIds`): a SIGHUP sent straight to one worker, not through the
supervisor, gets an entry of its own. Should the workers disagree (the file changed while
they read it), the entry has the first writer's result; each worker's log has its own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

from gateway.config import Config, ConfigError, config_warnings, load_config
from gateway.keygen import new_audit_id
from gateway.services import Services
from gateway.store.base import AuditEntry

logger = logging.getLogger("gateway.config")
LIVE_SERVER_SETTINGS = {"public_url"}  # read per request through the config
RELOAD_ID_ENV = "GATEWAY_RELOAD_ID_FILE"  # set by `serve --workers N` for its workers
AUDIT_ID_RE = re.compile(r"aud_[0-9a-f]{24}")


def announce_reload(path: str, now: float) -> str:
    """The supervisor's side: a fresh audit id for this reload, written where every worker
    reads it (replaced atomically: a worker never reads half an id). Call before
    signalling the workers."""
    reload_id = new_audit_id(now)
    partial = f"{path}.{os.getpid()}.partial"
    Path(partial).write_text(reload_id, encoding="ascii")
    os.replace(partial, path)
    return reload_id


class ReloadIds:
    """A worker's side: the audit id of each reload it is signalled for, the supervisor's
    when it announced one this worker has not used yet, else a fresh one."""

    def __init__(self, path: str | None):
        self._path = path
        self._used = self._announced()  # announced before this worker started: not ours

    @classmethod
    def from_env(cls) -> ReloadIds:
        return cls(os.environ.get(RELOAD_ID_ENV) or None)

    def next(self, now: float) -> str:
        announced = self._announced()
        if announced is not None and announced != self._used:
            self._used = announced
            return announced
        return new_audit_id(now)

    def _announced(self) -> str | None:
        if self._path is None:
            return None
        try:
            text = Path(self._path).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None  # not announced yet (or unreadable): a fresh id
        return text if AUDIT_ID_RE.fullmatch(text) else None


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


async def reload_config(services: Services, path: str, audit_id: str | None = None) -> bool:
    """Load, validate and apply `path`; count and audit the result (the entry's id:
    `audit_id`, shared by the workers of one reload, or a fresh one). True when applied."""
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


async def _audit(services: Services, result: str, problems: int, audit_id: str | None) -> None:
    """The reload's entry; the workers of one reload share its id, so the store keeps one."""
    now = services.clock()
    entry = AuditEntry(
        id=audit_id or new_audit_id(now),
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
