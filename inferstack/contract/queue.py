"""The Redis layout of the request queue: key names, the consumer group, delivery rules.

Keys, for prefix P (``INFERSTACK_QUEUE_PREFIX``, default ``inferstack``):
  P:requests        stream of QueueEntry (messages.py), read by the consumer group GROUP
  P:dead            stream, capped: entries no worker could serve, with the reason
  P:reply:<id>      list holding one Reply (messages.py) as JSON
  P:workers         sorted set: worker name -> heartbeat expiry (unix seconds, server clock)
  P:model           the ModelRecord (messages.py) of the model the workers serve
  P:arrivals        pub/sub channel, one message per enqueue: wakes workers filling a batch

Every multi-command step runs as a Redis function of the library FUNCTION_LIBRARY (source in
redis_functions.py), loaded with FUNCTION LOAD REPLACE by each worker at start and by the Redis
pod's own start hook; the web tier may only FCALL them (no EVAL, no SCRIPT).
"""

from __future__ import annotations

DEFAULT_PREFIX = "inferstack"
REQUESTS = "requests"
DEAD = "dead"
REPLY = "reply"
WORKERS = "workers"
MODEL = "model"
ARRIVALS = "arrivals"

# The consumer group every worker reads the request stream through (KEDA reads its lag).
GROUP = "workers"

HEARTBEAT_TTL_S = 5
# A request handed out this many times without an answer is failing the worker: answer it
# with an error instead of passing it on forever.
MAX_DELIVERIES = 3
# A reply list outlives the request's deadline by this much, then expires on its own.
REPLY_GRACE_S = 30
DEAD_LETTER_MAXLEN = 10_000

# The Redis function library and its functions (FCALL names).
FUNCTION_LIBRARY = "inferstack"
FN_ENQUEUE = "inferstack_enqueue"  # all of a request's images, or none (cap on waiting requests)
FN_WAITING = "inferstack_waiting"  # requests not yet answered: group lag + pending
FN_LIVE_WORKERS = "inferstack_live_workers"
FN_HEARTBEAT = "inferstack_heartbeat"
FN_NOW_MS = "inferstack_now_ms"
FN_TRIM_ANSWERED = "inferstack_trim_answered"


class Keys:
    """The key names of one queue (one prefix)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.stream = f"{prefix}:{REQUESTS}"
        self.workers = f"{prefix}:{WORKERS}"
        self.model = f"{prefix}:{MODEL}"
        self.arrivals = f"{prefix}:{ARRIVALS}"
        self.dead = f"{prefix}:{DEAD}"
        # Glob over every key of this queue (the ACL grants exactly these).
        self.pattern = f"{prefix}:*"

    def reply(self, request_id: str) -> str:
        return f"{self.prefix}:{REPLY}:{request_id}"
