"""Redis ACL users of the data plane: what each role may run, next to the protocol that runs it.

The operator renders these into the ``users.acl`` file Redis loads (``--aclfile``); the tests
start a real redis-server on that file and run the whole data plane through it. A command the
protocol starts to use must be added here, or the role gets ``NOPERM``.

Every user sees only the queue's keys (``<prefix>:*``) and its one pub/sub channel. Multi-step
work runs as the named Redis functions of redis_functions.py (FCALL); Redis checks every command
a function calls against the caller's ACL, so those commands are listed too, but no one may run
EVAL, EVALSHA or SCRIPT (a Lua loop would leave Redis answering BUSY). The web user is held to
the keys it needs, each with its own commands (ACL selectors): it can only ever create the
request stream, never a reply key or a key of another type, so it cannot wedge the workers.
``KEYS``, ``FLUSHALL``, ``CONFIG``, ``DEBUG``, ``MODULE`` and the rest of ``@admin``/``@dangerous``
are granted to nobody; the ``default`` user is off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from inferstack.contract.queue import Keys

__all__ = ["HEALTH", "HEALTH_COMMANDS", "KEDA", "KEDA_COMMANDS", "WEB", "WEB_COMMANDS", "WORKER", "WORKER_COMMANDS",
           "acl_file", "password_hash", "rules", "web_rules"]

WEB = "web"
WORKER = "worker"
KEDA = "keda"
HEALTH = "health"

# The web tier, per key (ACL selectors, see web_rules): enqueue (FCALL: XLEN, XINFO GROUPS, XADD,
# PUBLISH, TIME), the waiting count (FCALL: XLEN, XINFO GROUPS), the live workers (FCALL:
# ZREMRANGEBYSCORE, ZRANGE, TIME), the model info (GET), its reply (BLPOP). INFO: memory
# admission stops queueing near maxmemory, so that the workers' replies still fit (server
# statistics, no keys). XGROUP CREATE: the stream and the workers' group exist from start-up,
# before any worker ran, so KEDA can read the lag that starts the first one.
WEB_ANYWHERE = ("ping", "info", "time", "fcall", "fcall_ro", "publish")
WEB_ON_STREAM = ("xlen", "xinfo|groups", "xadd", "xgroup|create")
WEB_ON_WORKERS = ("zremrangebyscore", "zrange")
WEB_ON_MODEL = ("get",)
WEB_ON_REPLY = ("blpop",)
WEB_COMMANDS = (*WEB_ANYWHERE, *WEB_ON_STREAM, *WEB_ON_WORKERS, *WEB_ON_MODEL, *WEB_ON_REPLY)

# A worker: load the function library, heartbeat (FCALL: ZADD, SET), read its batches from the
# consumer group, wait for arrivals (SUBSCRIBE), reclaim a dead worker's requests, reply and
# acknowledge (MULTI/EXEC), move an entry it cannot serve to the dead-letter stream (XADD), trim
# answered entries off the stream's head (FCALL: XPENDING, XINFO GROUPS, XTRIM).
WORKER_COMMANDS = (
    "fcall", "fcall_ro", "function|load", "time", "ping", "zadd", "set", "zrem", "zremrangebyscore", "zrange",
    "xgroup|create", "xgroup|delconsumer", "xreadgroup", "xinfo|consumers", "xinfo|groups", "xpending",
    "xclaim", "xack", "xdel", "xadd", "xlen", "xtrim", "rpush", "expire", "subscribe", "unsubscribe",
    "multi", "exec", "discard",
)

# KEDA's redis-streams scaler: read-only, on the request stream only.
KEDA_COMMANDS = ("ping", "xlen", "xpending", "xinfo|groups", "xinfo|stream", "xinfo|consumers")

# The Redis pod's own user: its probes (PING) and its start hook, which loads the function
# library so the web tier can queue before any worker ran. Its password lives only in the Redis
# pod and the Secret, both of which hold every password anyway.
HEALTH_COMMANDS = ("ping", "function|load")


def web_rules(prefix: str) -> str:
    """The web user's keys, each with only the commands it needs there (Redis 7 ACL selectors)."""
    keys = Keys(prefix)

    def allow(commands: tuple[str, ...]) -> str:
        return " ".join(f"+{c}" for c in commands)

    # The root rules name the keys FCALL may declare; each selector (in parentheses) adds its
    # commands on its key only.
    return (f"~{keys.stream} ~{keys.workers} &{keys.arrivals} -@all {allow(WEB_ANYWHERE)} "
            f"(~{keys.stream} -@all {allow(WEB_ON_STREAM)}) (~{keys.workers} -@all {allow(WEB_ON_WORKERS)}) "
            f"(%R~{keys.model} -@all {allow(WEB_ON_MODEL)}) (~{keys.reply('*')} -@all {allow(WEB_ON_REPLY)})")


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
    if role == WEB:
        return web_rules(prefix)
    if role != WORKER:
        raise KeyError(role)
    return f"~{keys.pattern} &{keys.arrivals} -@all " + " ".join(f"+{c}" for c in WORKER_COMMANDS)


def acl_file(users: Mapping[str, tuple[str, str]], prefix: str) -> str:
    """An ACL file: the default user off, then one line per ``role -> (username, password)``."""
    lines = ["user default reset off"]
    for role, (username, password) in users.items():
        lines.append(f"user {username} reset on #{password_hash(password)} {rules(role, prefix)}")
    return "\n".join(lines) + "\n"
