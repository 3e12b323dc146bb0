"""Redis ACL users of the data plane: what each role may run, next to the protocol that runs it.

The operator renders these into the ``users.acl`` file Redis loads (``--aclfile``); the tests
start a real redis-server on that file and run the whole data plane through it. A command the
protocol starts to use must be added here, or the role gets ``NOPERM``.

Every user sees only the queue's keys (``<prefix>:*``) and its one pub/sub channel. Lua
scripts (EVALSHA, with EVAL/SCRIPT LOAD as redis-py's fallback) run with the caller's
permissions, so the commands they call are listed too. ``KEYS``, ``FLUSHALL``, ``CONFIG``,
``DEBUG``, ``MODULE`` and the rest of ``@admin``/``@dangerous`` are granted to nobody; the
``default`` user is off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from inferstack.contract.queue import Keys

__all__ = ["HEALTH", "HEALTH_COMMANDS", "KEDA", "KEDA_COMMANDS", "WEB", "WEB_COMMANDS", "WORKER", "WORKER_COMMANDS",
           "acl_file", "password_hash", "rules"]

WEB = "web"
WORKER = "worker"
KEDA = "keda"
HEALTH = "health"

# SCRIPT EXISTS: redis-py checks a pipeline's scripts before EXEC (the worker trims in its MULTI).
_SCRIPTS = ("evalsha", "eval", "script|load", "script|exists", "time")

# The web tier: enqueue (script: XLEN, XADD, PUBLISH), wait for the reply (BLPOP), read the
# queue depth, the model info and the live workers (script: ZREMRANGEBYSCORE, ZRANGE). INFO:
# memory admission stops queueing near maxmemory, so that the workers' replies still fit (INFO
# reads server statistics, no keys). XGROUP CREATE: the stream and the workers' group exist from
# start-up, before any worker ran, so KEDA can read the lag that starts the first one.
WEB_COMMANDS = (*_SCRIPTS, "ping", "xlen", "xadd", "publish", "blpop", "get", "zremrangebyscore", "zrange",
                "info", "xgroup|create")

# A worker: heartbeat (script: ZADD, SET), read its batches from the consumer group, wait for
# arrivals (SUBSCRIBE), reclaim a dead worker's requests, reply and acknowledge (MULTI/EXEC),
# move an entry it cannot serve to the dead-letter stream (XADD), trim answered entries off the
# stream's head (script: XPENDING, XINFO GROUPS, XTRIM).
WORKER_COMMANDS = (
    *_SCRIPTS, "ping", "zadd", "set", "zrem", "zremrangebyscore", "zrange",
    "xgroup|create", "xgroup|delconsumer", "xreadgroup", "xinfo|consumers", "xinfo|groups", "xpending",
    "xclaim", "xack", "xdel", "xadd", "xtrim", "rpush", "expire", "subscribe", "unsubscribe",
    "multi", "exec", "discard",
)

# KEDA's redis-streams scaler: read-only, on the request stream only.
KEDA_COMMANDS = ("ping", "xlen", "xpending", "xinfo|groups", "xinfo|stream", "xinfo|consumers")

# The Redis pod's own readiness probe: PING, no keys.
HEALTH_COMMANDS = ("ping",)


def password_hash(password: str) -> str:
    """The form the ACL file stores (``#<sha256>``), so the file holds no password."""
    return hashlib.sha256(password.encode()).hexdigest()


def rules(role: str, prefix: str) -> str:
    """The ACL rules of ``role`` (everything after its password)."""
    keys = Keys(prefix)
    if role == KEDA:
        return f"%R~{keys.stream} -@all " + " ".join(f"+{c}" for c in KEDA_COMMANDS)
    if role == HEALTH:
        return "-@all " + " ".join(f"+{c}" for c in HEALTH_COMMANDS)
    commands = {WEB: WEB_COMMANDS, WORKER: WORKER_COMMANDS}[role]
    return f"~{keys.pattern} &{keys.arrivals} -@all " + " ".join(f"+{c}" for c in commands)


def acl_file(users: Mapping[str, tuple[str, str]], prefix: str) -> str:
    """An ACL file: the default user off, then one line per ``role -> (username, password)``."""
    lines = ["user default reset off"]
    for role, (username, password) in users.items():
        lines.append(f"user {username} reset on #{password_hash(password)} {rules(role, prefix)}")
    return "\n".join(lines) + "\n"
