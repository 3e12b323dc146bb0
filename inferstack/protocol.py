"""The queue protocol between the web tier and the workers: the only code that knows Redis keys.

Requests go into one Redis stream read by a consumer group, so each request is handed to
exactly one worker and stays in the group's pending list until that worker acknowledges it.
Every worker keeps a heartbeat (a sorted-set member whose score is its expiry, in Redis
server time); a worker whose heartbeat lapsed is dead, and any live worker claims its
pending requests (at-least-once delivery). Replies go to a per-request list that the web
request waits on with BLPOP, and that expires on its own if the client gave up.
Nothing polls: the worker blocks in XREADGROUP, the web request blocks in BLPOP.

Keys, for prefix P:
  P:requests        stream: id, h, w, c, top_k, deadline_ms, data (raw uint8 pixels),
                    probs ("1": also reply with every class's probability; absent means no)
  P:reply:<id>      list holding one JSON reply: {"ok", "predictions", "model", "probabilities"?}
                    or {"ok": false, "error"}; "probabilities" is base64 of float32 little-endian
  P:workers         sorted set: worker name -> heartbeat expiry (unix seconds, server clock)
  P:model           JSON describing the model the workers serve (input size, classes, labels)
  P:arrivals        pub/sub channel, one message per enqueue: wakes workers filling a batch
                    (Redis blocking-command timeouts tick at server.hz, ~100 ms: too coarse for
                    a 5 ms batch window, so the window is timed on the worker's side)
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

GROUP = "workers"
HEARTBEAT_TTL_S = 5
# A request handed out this many times without an answer is failing the worker: answer it
# with an error instead of passing it on forever.
MAX_DELIVERIES = 3
REPLY_GRACE_S = 30

# Atomic "enqueue unless full": XLEN and XADD in one script so concurrent web processes
# cannot overshoot the cap. The deadline is taken from the Redis clock, shared by all pods.
_ENQUEUE = """
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then return {0, n} end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XADD', KEYS[1], '*', 'id', ARGV[3], 'h', ARGV[4], 'w', ARGV[5], 'c', ARGV[6],
           'top_k', ARGV[7], 'deadline_ms', now_ms + tonumber(ARGV[2]), 'data', ARGV[8], 'probs', ARGV[9])
redis.call('PUBLISH', KEYS[2], '1')
return {1, n + 1}
"""

_HEARTBEAT = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(ARGV[2]), ARGV[1])
if ARGV[3] ~= '' then redis.call('SET', KEYS[2], ARGV[3], 'EX', tonumber(ARGV[2]) * 6) end
return 1
"""

_LIVE_WORKERS = """
local t = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. t[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

_NOW_MS = """
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""


class QueueFull(Exception):
    """The stream already holds max_queue requests."""


class ReplyTimeout(Exception):
    """No reply arrived within the request timeout."""


@dataclass(frozen=True)
class Request:
    """One queued image, as a worker sees it."""

    entry_id: bytes
    request_id: str
    pixels: np.ndarray  # uint8, (h, w, c)
    top_k: int
    deadline_ms: int
    deliveries: int = 1
    probabilities: bool = False  # the client wants the whole vector (v2), not only the top k


def connect(url: str, timeout_s: float = 2.0) -> redis.Redis:
    """A client that fails fast when Redis is away and reconnects by itself when it is back."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=min(timeout_s, 2.0),
        socket_timeout=timeout_s,
        # One immediate retry covers a pooled connection that Redis closed (e.g. a restart).
        retry=Retry(NoBackoff(), 1),
        health_check_interval=15,
    )


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stream = f"{prefix}:requests"
        self.workers = f"{prefix}:workers"
        self.model = f"{prefix}:model"
        self.arrivals = f"{prefix}:arrivals"

    def reply(self, request_id: str) -> str:
        return f"{self.prefix}:reply:{request_id}"


class WebQueue:
    """What a web process does: enqueue a request and wait for its reply."""

    def __init__(self, url: str, prefix: str, max_queue: int, timeout_s: float) -> None:
        self.keys = Keys(prefix)
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.fast = connect(url, timeout_s=2.0)
        # BLPOP holds the socket for the whole request timeout.
        self.blocking = connect(url, timeout_s=timeout_s + 5.0)
        self._enqueue = self.fast.register_script(_ENQUEUE)
        self._live = self.fast.register_script(_LIVE_WORKERS)

    def submit(self, pixels: np.ndarray, top_k: int, probabilities: bool = False) -> str:
        """Queue one image; raises QueueFull at the cap, redis.RedisError when Redis is away."""
        if pixels.dtype != np.uint8 or pixels.ndim != 3:
            raise ValueError("pixels must be a uint8 array of shape (h, w, c)")
        request_id = uuid.uuid4().hex
        h, w, c = pixels.shape
        ok, depth = self._enqueue(
            keys=[self.keys.stream, self.keys.arrivals],
            args=[self.max_queue, int(self.timeout_s * 1000), request_id, h, w, c, top_k,
                  np.ascontiguousarray(pixels).tobytes(), "1" if probabilities else "0"],
        )
        if not ok:
            raise QueueFull(f"queue holds {depth} requests (limit {self.max_queue})")
        return request_id

    def wait(self, request_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        item = self.blocking.blpop([self.keys.reply(request_id)], timeout=max(timeout, 0.01))
        if item is None:
            raise ReplyTimeout(f"no result within {timeout:g} s")
        return json.loads(item[1])

    def depth(self) -> int:
        return int(self.fast.xlen(self.keys.stream))

    def live_workers(self) -> list[str]:
        return [m.decode() for m in self._live(keys=[self.keys.workers])]

    def model_info(self) -> dict[str, Any] | None:
        raw = self.fast.get(self.keys.model)
        return json.loads(raw) if raw else None


class WorkerQueue:
    """What a worker does: heartbeat, take batches, reclaim a dead worker's requests, reply."""

    def __init__(self, url: str, prefix: str, name: str, block_ms: int = 1000) -> None:
        self.keys = Keys(prefix)
        self.name = name
        self.block_ms = block_ms
        self.redis = connect(url, timeout_s=block_ms / 1000 + 5.0)
        self._heartbeat = self.redis.register_script(_HEARTBEAT)
        self._live = self.redis.register_script(_LIVE_WORKERS)
        self._now = self.redis.register_script(_NOW_MS)
        self._own_backlog_checked = False
        self._arrivals: redis.client.PubSub | None = None
        self._last_batch = 0

    def ensure_group(self) -> None:
        try:
            # Id 0, not $: requests queued before the first worker came up must be served.
            self.redis.xgroup_create(self.keys.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def heartbeat(self, model_info: dict[str, Any] | None = None) -> None:
        info = json.dumps(model_info) if model_info else ""
        self._heartbeat(keys=[self.keys.workers, self.keys.model], args=[self.name, HEARTBEAT_TTL_S, info])

    def leave(self) -> None:
        self.redis.zrem(self.keys.workers, self.name)

    def reset_after_disconnect(self) -> None:
        # Redis may have come back with our unacknowledged requests (persistence on): re-read them.
        self._own_backlog_checked = False
        if self._arrivals is not None:
            try:
                self._arrivals.close()
            except redis.RedisError:
                pass
            self._arrivals = None

    def now_ms(self) -> int:
        return int(self._now())

    def _read(self, count: int, block_ms: int | None, start: str = ">") -> list[Request]:
        try:
            resp = self.redis.xreadgroup(GROUP, self.name, {self.keys.stream: start}, count=count, block=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis lost its data (restart without persistence): recreate and carry on.
            self.ensure_group()
            return []
        out: list[Request] = []
        for _stream, entries in resp or []:
            for entry_id, fields in entries:
                if fields:  # a pending entry deleted meanwhile comes back empty
                    out.append(_decode(entry_id, fields))
        return out

    def take_batch(self, batch_size: int, max_delay_ms: float) -> list[Request]:
        """Block until at least one request is queued, then fill up to batch_size within max_delay_ms."""
        if not self._own_backlog_checked:
            # A restart under the same name: our own unacknowledged requests come first.
            self._own_backlog_checked = True
            own = self._read(batch_size, None, start="0")
            if own:
                return own
        batch = self._read(batch_size, None)
        backlog = bool(batch)
        if not batch:
            batch = self._read(batch_size, self.block_ms)
        previous, self._last_batch = self._last_batch, len(batch)
        if not batch or max_delay_ms <= 0 or len(batch) >= batch_size:
            return batch
        if not backlog and previous <= 1:
            # An idle worker woken by a lone request after a lone request: no sign of concurrent
            # traffic, so waiting would only add latency. Under load the queue is never empty
            # when we come back for more, and the window applies.
            return batch
        end = time.monotonic() + max_delay_ms / 1000
        arrivals = self._subscribe()
        while arrivals.get_message(timeout=0) is not None:
            pass  # announcements of requests we already hold
        batch += self._read(batch_size - len(batch), None)
        while len(batch) < batch_size:
            left = end - time.monotonic()
            if left <= 0:
                break
            if arrivals.get_message(timeout=left) is not None:
                batch += self._read(batch_size - len(batch), None)
        self._last_batch = len(batch)
        return batch

    def _subscribe(self) -> redis.client.PubSub:
        if self._arrivals is None:
            self._arrivals = self.redis.pubsub(ignore_subscribe_messages=True)
            self._arrivals.subscribe(self.keys.arrivals)
        return self._arrivals

    def reclaim_from_dead(self, limit: int) -> list[Request]:
        """Claim requests held by workers whose heartbeat lapsed (killed, crashed, partitioned)."""
        live = {m.decode() for m in self._live(keys=[self.keys.workers])}
        live.add(self.name)
        try:
            consumers = self.redis.xinfo_consumers(self.keys.stream, GROUP)
        except redis.ResponseError:
            return []
        claimed: list[Request] = []
        for consumer in consumers:
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
            if name in live:
                continue
            if consumer["pending"] == 0:
                # Forget consumers that are long gone so XINFO stays short.
                if consumer.get("idle", 0) > 10 * 60 * 1000:
                    self.redis.xgroup_delconsumer(self.keys.stream, GROUP, name)
                continue
            pending = self.redis.xpending_range(
                self.keys.stream, GROUP, min="-", max="+", count=limit - len(claimed), consumername=name
            )
            if not pending:
                continue
            deliveries = {p["message_id"]: p["times_delivered"] for p in pending}
            # min_idle_time guards against two reclaimers racing for the same entries.
            entries = self.redis.xclaim(
                self.keys.stream, GROUP, self.name, min_idle_time=HEARTBEAT_TTL_S * 1000 // 2,
                message_ids=list(deliveries),
            )
            for entry_id, fields in entries:
                if fields:
                    req = _decode(entry_id, fields)
                    claimed.append(_with_deliveries(req, deliveries.get(entry_id, 1) + 1))
                else:
                    self.redis.xack(self.keys.stream, GROUP, entry_id)
            if len(claimed) >= limit:
                break
        return claimed

    def complete(self, results: list[tuple[Request, dict[str, Any] | None]], now_ms: int) -> None:
        """Write replies and acknowledge, atomically: a request is either answered or still pending."""
        pipe = self.redis.pipeline(transaction=True)
        for req, reply in results:
            if reply is not None:
                key = self.keys.reply(req.request_id)
                pipe.rpush(key, json.dumps(reply))
                ttl_s = max(1, (req.deadline_ms - now_ms) // 1000) + REPLY_GRACE_S
                pipe.expire(key, ttl_s)
            pipe.xack(self.keys.stream, GROUP, req.entry_id)
            pipe.xdel(self.keys.stream, req.entry_id)
        pipe.execute()


def _with_deliveries(req: Request, n: int) -> Request:
    return Request(req.entry_id, req.request_id, req.pixels, req.top_k, req.deadline_ms, n, req.probabilities)


def _decode(entry_id: bytes, fields: dict[bytes, bytes]) -> Request:
    h, w, c = int(fields[b"h"]), int(fields[b"w"]), int(fields[b"c"])
    pixels = np.frombuffer(fields[b"data"], dtype=np.uint8).reshape(h, w, c)
    return Request(
        entry_id=entry_id,
        request_id=fields[b"id"].decode(),
        pixels=pixels,
        top_k=int(fields[b"top_k"]),
        deadline_ms=int(fields[b"deadline_ms"]),
        probabilities=fields.get(b"probs") == b"1",
    )


def encode_probabilities(probs: np.ndarray) -> str:
    """A probability vector as reply JSON carries it: 4 bytes a class instead of ~20 as decimals."""
    return base64.b64encode(np.asarray(probs, dtype="<f4").tobytes()).decode("ascii")


def decode_probabilities(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")
