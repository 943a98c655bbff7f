"""`SIGHUP`: re-read the config file in this worker without dropping a request.

The new file is loaded and validated whole; any problem refuses it whole (the old config
stays, each problem logged as `check-config` prints it). A valid file replaces the
directory's config part in one swap (`Services.reconfigure`): tenants, keys, limits,
policy, pricing, upstream keys, admin keys and webhook settings apply from the next
request. Settings read once at start (the store URL, the [server] section but public_url)
are named in a warning and wait for a restart.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from gateway.config import Config, ConfigError, config_warnings, load_config
from gateway.keygen import new_audit_id
from gateway.services import Services
from gateway.store.base import AuditEntry

logger = logging.getLogger("gateway.config")
LIVE_SERVER_SETTINGS = {"public_url"}  # read per request through the config


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


async def reload_config(services: Services, path: str) -> bool:
    """Load, validate and apply `path`; count and audit the result. True when applied."""
    old = services.config
    problems: list[str] = []
    try:
        new = load_config(path)
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
    await _audit(services, result, len(problems))
    return not problems


async def _audit(services: Services, result: str, problems: int) -> None:
    """One entry per worker that reloaded (they reload independently)."""
    now = services.clock()
    entry = AuditEntry(
        id=new_audit_id(now),
        time=now,
        actor_type="config",
        actor_id="sighup",
        action="config.reload",
        changes={"result": result, "problems": problems, "pid": os.getpid()},
    )
    try:
        await services.store.append_audit(entry)
    except Exception:
        logger.exception("config reload: the audit entry could not be written")
