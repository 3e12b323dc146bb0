"""The queue protocol between the web tier and the workers: the only code that knows Redis keys.

Requests go into one Redis stream read by a consumer group, so each request is handed to
exactly one worker and stays in the group's pending list until that worker acknowledges it.
Every worker keeps a heartbeat (a sorted-set member whose score is its expiry, in Redis
server time); a worker whose heartbeat lapsed is dead, and any live worker claims its
pending requests (at-least-once delivery). Replies go to a per-request list that the web
request waits on with BLPOP, and that expires on its own if the client gave up.
Nothing polls: the worker blocks in XREADGROUP, the web request blocks in BLPOP.

The key names (inferstack.contract.queue) and the messages with their wire shape
(inferstack.contract.messages) are defined in the contract; this module runs them on Redis.
(Redis blocking-command timeouts tick at server.hz, ~100 ms: too coarse for a 5 ms batch
window, so the window is timed on the worker's side, woken by the arrivals channel.)
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

from inferstack.contract.messages import (
    DEADLINE_FIELD,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    EntryError,
    ModelRecord,
    QueueEntry,
    Reply,
)
from inferstack.contract.queue import (
    DEAD_LETTER_MAXLEN,
    GROUP,
    HEARTBEAT_TTL_S,
    MAX_DELIVERIES,
    REPLY_GRACE_S,
    Keys,
)

# Re-exported: the names this module has always offered (tests and other branches import them).
__all__ = [
    "DEAD_LETTER_MAXLEN", "GROUP", "HEARTBEAT_TTL_S", "MAX_DELIVERIES", "PROTOCOL_VERSION", "REPLY_GRACE_S",
    "SUPPORTED_VERSIONS", "Keys", "ModelRecord", "Poison", "QueueEntry", "QueueFull", "RedisFull", "Reply",
    "ReplyTimeout", "Request", "WebQueue", "WorkerQueue", "connect", "decode_entry", "decode_probabilities",
    "encode_entry", "encode_probabilities", "ensure_group",
]

# Above this share of maxmemory the web tier stops queueing (503) so that the workers'
# replies, which need memory too, still fit.
MEMORY_ADMISSION_RATIO = 0.9

# Atomic "enqueue unless full": XLEN and XADD in one script so concurrent web processes
# cannot overshoot the cap. The deadline is taken from the Redis clock, shared by all pods.
# ARGV: max_queue, timeout_ms, then the entry's field/value pairs.
_ENQUEUE = """
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then return {0, n} end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local args = {KEYS[1], '*'}
for i = 3, #ARGV do args[#args + 1] = ARGV[i] end
args[#args + 1] = '%s'
args[#args + 1] = now_ms + tonumber(ARGV[2])
redis.call('XADD', unpack(args))
redis.call('PUBLISH', KEYS[2], '1')
return {1, n + 1}
""" % DEADLINE_FIELD

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

# Drop answered entries from the stream: everything older than the oldest entry still pending,
# or, with nothing pending, everything the group has read. Trimming from the head (XTRIM MINID)
# keeps the group's lag exact; XDEL of an entry above the oldest pending one (workers finishing
# out of order) makes Redis report the lag as NULL, which KEDA reads as 0. ARGV[1]: the group.
_TRIM_ANSWERED = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1])
local floor = false
if p[1] > 0 then
  floor = p[2]
else
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f['name'] == ARGV[1] then
      local ms, seq = string.match(f['last-delivered-id'], '^(%d+)-(%d+)$')
      floor = ms .. '-' .. string.format('%.0f', tonumber(seq) + 1)
    end
  end
end
if floor then return redis.call('XTRIM', KEYS[1], 'MINID', floor) end
return 0
"""

_NOW_MS = """
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""


class QueueFull(Exception):
    """The stream already holds max_queue requests."""


class ReplyTimeout(Exception):
    """No reply arrived within the request timeout."""


class RedisFull(Exception):
    """Redis is at (or close to) maxmemory: queueing more would starve the replies."""


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


@dataclass(frozen=True)
class Poison:
    """A stream entry no worker can serve; request_id is set when its client can still be told."""

    entry_id: bytes
    reason: str
    request_id: str | None
    fields: dict[bytes, bytes]
    deliveries: int = 1


def encode_entry(request_id: str, pixels: np.ndarray, top_k: int, probabilities: bool = False) -> list[Any]:
    """The stream fields of one request, flat (field, value, ...); the enqueue script adds the deadline."""
    h, w, c = pixels.shape
    return QueueEntry(request_id, h, w, c, top_k, np.ascontiguousarray(pixels).tobytes(), probabilities).to_wire()


def decode_entry(entry_id: bytes, fields: dict[bytes, bytes], deliveries: int = 1) -> Request | Poison:
    """One stream entry -> a Request, or a Poison saying why it cannot be served (never raises)."""
    try:
        entry = QueueEntry.from_wire(fields)
    except EntryError as exc:
        return Poison(entry_id, exc.reason, exc.request_id, fields, deliveries)
    pixels = np.frombuffer(entry.data, dtype=np.uint8).reshape(entry.height, entry.width, entry.channels)
    assert entry.deadline_ms is not None  # from_wire requires it
    return Request(entry_id=entry_id, request_id=entry.request_id, pixels=pixels, top_k=entry.top_k,
                   deadline_ms=entry.deadline_ms, deliveries=deliveries, probabilities=entry.probabilities)


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


def ensure_group(client: redis.Redis, stream: str) -> None:
    """The consumer group on the request stream (and the stream), idempotently."""
    try:
        # Id 0, not $: requests queued before the first worker came up must be served.
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


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
        self._memory_checked = 0.0
        self._memory_full = False
        self._memory_admission = True

    def check_memory(self, every_s: float = 0.5) -> None:
        """Raise RedisFull when Redis is near maxmemory (INFO at most every every_s per process)."""
        now = time.monotonic()
        if self._memory_admission and now - self._memory_checked >= every_s:
            try:
                info = self.fast.info("memory")
            except redis.ResponseError:
                # An ACL without INFO: rely on Redis' own OOM refusal (also answered 503).
                self._memory_admission = False
                return
            limit = int(info.get("maxmemory", 0))
            self._memory_full = limit > 0 and int(info["used_memory"]) >= limit * MEMORY_ADMISSION_RATIO
            self._memory_checked = now
        if self._memory_full:
            raise RedisFull("Redis is close to its memory limit")

    def submit(self, pixels: np.ndarray, top_k: int, probabilities: bool = False) -> str:
        """Queue one image; raises QueueFull at the cap, RedisFull near maxmemory, redis.RedisError when away."""
        if pixels.dtype != np.uint8 or pixels.ndim != 3:
            raise ValueError("pixels must be a uint8 array of shape (h, w, c)")
        self.check_memory()
        request_id = uuid.uuid4().hex
        try:
            ok, depth = self._enqueue(
                keys=[self.keys.stream, self.keys.arrivals],
                args=[self.max_queue, int(self.timeout_s * 1000), *encode_entry(request_id, pixels, top_k, probabilities)],
            )
        except redis.ResponseError as exc:
            if isinstance(exc, redis.exceptions.OutOfMemoryError) or "maxmemory" in str(exc):
                self._memory_full, self._memory_checked = True, time.monotonic()
                raise RedisFull(str(exc)) from None
            raise
        if not ok:
            raise QueueFull(f"queue holds {depth} requests (limit {self.max_queue})")
        return request_id

    def wait_reply(self, request_id: str, timeout_s: float | None = None) -> Reply:
        """The worker's Reply to one request; raises ReplyTimeout."""
        return Reply.from_wire(self._wait_raw(request_id, timeout_s))

    def wait(self, request_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """The reply as its JSON object (the wire shape of Reply)."""
        return json.loads(self._wait_raw(request_id, timeout_s))

    def _wait_raw(self, request_id: str, timeout_s: float | None) -> bytes:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        item = self.blocking.blpop([self.keys.reply(request_id)], timeout=max(timeout, 0.01))
        if item is None:
            raise ReplyTimeout(f"no result within {timeout:g} s")
        return item[1]

    def depth(self) -> int:
        return int(self.fast.xlen(self.keys.stream))

    def live_workers(self) -> list[str]:
        return [m.decode() for m in self._live(keys=[self.keys.workers])]

    def model_info(self) -> dict[str, Any] | None:
        """The ModelRecord the workers advertise, as its JSON object (None before any worker ran)."""
        raw = self.fast.get(self.keys.model)
        return json.loads(raw) if raw else None

    def model_record(self) -> ModelRecord | None:
        raw = self.fast.get(self.keys.model)
        return ModelRecord.from_wire(raw) if raw else None

    def ensure_group(self) -> None:
        """Create the stream and the workers' group if missing: KEDA reads the group's lag to
        start the first worker, so both must exist before any worker ever ran."""
        ensure_group(self.fast, self.keys.stream)


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
        self._trim = self.redis.register_script(_TRIM_ANSWERED)
        self._own_backlog_checked = False
        self._arrivals: redis.client.PubSub | None = None
        self._last_batch = 0

    def ensure_group(self) -> None:
        ensure_group(self.redis, self.keys.stream)

    def heartbeat(self, model_info: ModelRecord | dict[str, Any] | None = None) -> None:
        if isinstance(model_info, ModelRecord):
            info = model_info.to_wire()
        else:
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

    def _read(self, count: int, block_ms: int | None, start: str = ">") -> list[Request | Poison]:
        try:
            resp = self.redis.xreadgroup(GROUP, self.name, {self.keys.stream: start}, count=count, block=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis lost its data (restart without persistence): recreate and carry on.
            self.ensure_group()
            return []
        entries = [(entry_id, fields) for _stream, batch in resp or [] for entry_id, fields in batch]
        # A pending entry deleted meanwhile comes back empty: nothing left to answer.
        gone = [entry_id for entry_id, fields in entries if not fields]
        if gone:
            self.redis.xack(self.keys.stream, GROUP, *gone)
        entries = [(entry_id, fields) for entry_id, fields in entries if fields]
        deliveries: dict[bytes, int] = {}
        if start != ">" and entries:
            # Re-read history: Redis counted every earlier hand-out, ours included.
            deliveries = self._times_delivered([entry_id for entry_id, _ in entries], self.name)
        return [decode_entry(entry_id, fields, deliveries.get(entry_id, 1)) for entry_id, fields in entries]

    def _times_delivered(self, entry_ids: list[bytes], consumer: str | None = None) -> dict[bytes, int]:
        lo, hi = min(entry_ids), max(entry_ids)
        pending = self.redis.xpending_range(
            self.keys.stream, GROUP, min=lo, max=hi, count=len(entry_ids) + 100, consumername=consumer
        )
        return {p["message_id"]: int(p["times_delivered"]) for p in pending}

    def own_backlog(self) -> list[Request | Poison]:
        """After a (re)start under the same name: our oldest unacknowledged request, one at a time.

        One at a time because one of them may be what killed us: the others must not share its fate.
        """
        if self._own_backlog_checked:
            return []
        own = self._read(1, None, start="0")
        if not own:
            self._own_backlog_checked = True
        return own

    def take_batch(self, batch_size: int, max_delay_ms: float) -> list[Request | Poison]:
        """Block until at least one request is queued, then fill up to batch_size within max_delay_ms."""
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

    def reclaim_from_dead(self) -> Request | Poison | None:
        """Claim ONE request held by a worker whose heartbeat lapsed (killed, crashed, hung).

        One at a time: the dead worker's batch may hold the input that killed it, and the
        innocent requests beside it must not be failed with it.
        """
        live = {m.decode() for m in self._live(keys=[self.keys.workers])}
        live.add(self.name)
        try:
            consumers = self.redis.xinfo_consumers(self.keys.stream, GROUP)
        except redis.ResponseError:
            return None
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
                self.keys.stream, GROUP, min="-", max="+", count=1, consumername=name
            )
            if not pending:
                continue
            entry_id = pending[0]["message_id"]
            # min_idle_time guards against two reclaimers racing for the same entry.
            entries = self.redis.xclaim(
                self.keys.stream, GROUP, self.name, min_idle_time=HEARTBEAT_TTL_S * 1000 // 2,
                message_ids=[entry_id],
            )
            for claimed_id, fields in entries:
                if not fields:
                    self.redis.xack(self.keys.stream, GROUP, claimed_id)
                    continue
                # XCLAIM counted this hand-out too: ask Redis rather than adding one ourselves.
                times = self._times_delivered([claimed_id], self.name).get(claimed_id, 1)
                return decode_entry(claimed_id, fields, times)
        return None

    def complete(self, results: list[tuple[Request, Reply | dict[str, Any] | None]], now_ms: int,
                 dead: list[Poison] = ()) -> None:
        """Write replies and acknowledge, atomically: a request is either answered or still pending.

        Poison entries go to the dead-letter stream with their reason, and their client (when
        the entry names one) is answered with an error at once.
        """
        pipe = self.redis.pipeline(transaction=True)
        for req, reply in results:
            if reply is not None:
                self._reply(pipe, req.request_id, reply, max(1, (req.deadline_ms - now_ms) // 1000))
            pipe.xack(self.keys.stream, GROUP, req.entry_id)
        for poison in dead:
            record: dict[str, Any] = {
                k.decode(errors="replace"): v for k, v in poison.fields.items() if k != b"data"
            }
            record.update(entry=poison.entry_id, reason=poison.reason, worker=self.name,
                          deliveries=poison.deliveries, data_bytes=len(poison.fields.get(b"data", b"")))
            pipe.xadd(self.keys.dead, record, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
            if poison.request_id is not None:
                error = Reply.failure("The request could not be processed by the workers; retrying it "
                                      "will not help. Report it if it persists.", poison.reason)
                self._reply(pipe, poison.request_id, error, 0)
            pipe.xack(self.keys.stream, GROUP, poison.entry_id)
        self._trim(keys=[self.keys.stream], args=[GROUP], client=pipe)
        pipe.execute()

    def _reply(self, pipe: Any, request_id: str, reply: Reply | dict[str, Any], ttl_s: int) -> None:
        key = self.keys.reply(request_id)
        pipe.rpush(key, reply.to_wire() if isinstance(reply, Reply) else json.dumps(reply))
        pipe.expire(key, ttl_s + REPLY_GRACE_S)


def encode_probabilities(probs: np.ndarray) -> str:
    """A probability vector as reply JSON carries it: 4 bytes a class instead of ~20 as decimals."""
    return base64.b64encode(np.asarray(probs, dtype="<f4").tobytes()).decode("ascii")


def decode_probabilities(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")
