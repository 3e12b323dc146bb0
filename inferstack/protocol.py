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
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    EntryError,
    ModelRecord,
    QueueEntry,
    Reply,
)
from inferstack.contract.queue import (
    DEAD_LETTER_MAXLEN,
    FN_ENQUEUE,
    FN_HEARTBEAT,
    FN_LIVE_WORKERS,
    FN_NOW_MS,
    FN_TRIM_ANSWERED,
    FN_WAITING,
    GROUP,
    HEARTBEAT_TTL_S,
    MAX_DELIVERIES,
    REPLY_GRACE_S,
    Keys,
)
from inferstack.contract.redis_functions import LIBRARY

# Re-exported: the names this module has always offered (tests and other branches import them).
__all__ = [
    "DEAD_LETTER_MAXLEN", "GROUP", "HEARTBEAT_TTL_S", "MAX_DELIVERIES", "PROTOCOL_VERSION", "REPLY_GRACE_S",
    "SUPPORTED_VERSIONS", "Keys", "ModelRecord", "Poison", "QueueEntry", "QueueFull", "RedisFull", "Reply",
    "ReplyTimeout", "Request", "WebQueue", "WorkerQueue", "connect", "decode_entry", "decode_probabilities",
    "encode_entry", "encode_probabilities", "ensure_group", "is_transient", "load_functions",
]

# Above this share of maxmemory the web tier stops queueing (503) so that the workers'
# replies, which need memory too, still fit.
MEMORY_ADMISSION_RATIO = 0.9

# Redis errors that mean "away or busy for now": retrying is right and is progress, not a hang.
_TRANSIENT = ("BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN", "READONLY", "OOM", "CLUSTERDOWN")


def is_transient(exc: redis.RedisError) -> bool:
    """Redis is unreachable, restarting or refusing for a while; not an error in what we sent."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
                        redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)):
        return True
    return str(exc).startswith(_TRANSIENT)


def _missing_function(exc: redis.ResponseError) -> bool:
    return "function not found" in str(exc).lower()


def load_functions(client: redis.Redis) -> None:
    """Load (or replace) the queue's function library: the worker and the Redis pod's hook do this."""
    client.function_load(LIBRARY, replace=True)


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
        return self.submit_many([pixels], top_k, probabilities)[0]

    def submit_many(self, images: list[np.ndarray], top_k: int, probabilities: bool = False) -> list[str]:
        """Queue a request's images all at once (one function call) or none: their request ids, in order.

        Raises QueueFull when they would take the waiting requests past the cap, RedisFull near
        maxmemory, redis.RedisError when Redis is away.
        """
        if not images or any(p.dtype != np.uint8 or p.ndim != 3 for p in images):
            raise ValueError("images must be uint8 arrays of shape (h, w, c), at least one")
        self.check_memory()
        ids = [uuid.uuid4().hex for _ in images]
        args: list[Any] = [self.max_queue, int(self.timeout_s * 1000), self.keys.arrivals, GROUP, len(images)]
        for request_id, pixels in zip(ids, images):
            fields = encode_entry(request_id, pixels, top_k, probabilities)
            args += [len(fields), *fields]
        try:
            ok, depth = self.fast.fcall(FN_ENQUEUE, 1, self.keys.stream, *args)
        except redis.ResponseError as exc:
            if isinstance(exc, redis.exceptions.OutOfMemoryError) or "maxmemory" in str(exc):
                self._memory_full, self._memory_checked = True, time.monotonic()
                raise RedisFull(str(exc)) from None
            raise
        if not ok:
            raise QueueFull(f"{depth} requests wait (limit {self.max_queue}); this one has {len(images)} image(s)")
        return ids

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
        """Requests waiting for an answer (queued or being worked on), what the cap counts."""
        return int(self.fast.fcall(FN_WAITING, 1, self.keys.stream, GROUP))

    def live_workers(self) -> list[str]:
        return [m.decode() for m in self.fast.fcall(FN_LIVE_WORKERS, 1, self.keys.workers)]

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
        self._own_backlog_checked = False
        self._arrivals: redis.client.PubSub | None = None
        self._last_batch = 0

    def ensure_group(self) -> None:
        """The function library (this release's), the stream and the group: at start and after Redis lost them."""
        load_functions(self.redis)
        ensure_group(self.redis, self.keys.stream)

    def _fcall(self, function: str, keys: list[str], args: list[Any] = ()) -> Any:
        """FCALL, loading the library first when Redis lost it (a restart without persistence)."""
        try:
            return self.redis.fcall(function, len(keys), *keys, *args)
        except redis.ResponseError as exc:
            if not _missing_function(exc):
                raise
        load_functions(self.redis)
        return self.redis.fcall(function, len(keys), *keys, *args)

    def heartbeat(self, model_info: ModelRecord | dict[str, Any] | None = None) -> None:
        if isinstance(model_info, ModelRecord):
            info = model_info.to_wire()
        else:
            info = json.dumps(model_info) if model_info else ""
        self._fcall(FN_HEARTBEAT, [self.keys.workers, self.keys.model], [self.name, HEARTBEAT_TTL_S, info])

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
        return int(self._fcall(FN_NOW_MS, []))

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
        # Subscribed only for the window: a subscription nobody reads (idle in XREADGROUP, busy in
        # the model) would make Redis buffer every arrival notice for this client.
        arrivals = self._subscribe()
        try:
            while arrivals.get_message(timeout=0) is not None:
                pass  # stale notices, and those of requests we already hold
            batch += self._read(batch_size - len(batch), None)
            while len(batch) < batch_size:
                left = end - time.monotonic()
                if left <= 0:
                    break
                if arrivals.get_message(timeout=left) is not None:
                    batch += self._read(batch_size - len(batch), None)
        finally:
            arrivals.unsubscribe()
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
        live = {m.decode() for m in self._fcall(FN_LIVE_WORKERS, [self.keys.workers])}
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
        the entry names one) is answered with an error at once. A reply key someone made into
        another type (WRONGTYPE) cannot take its answer: that request is dead-lettered too,
        rather than retrying a reply that can never be written.
        """
        pipe = self.redis.pipeline(transaction=True)
        replies: dict[int, tuple[bytes, str]] = {}  # pipeline index of each RPUSH -> (entry, request)
        for req, reply in results:
            if reply is not None:
                replies[len(pipe)] = (req.entry_id, req.request_id)
                self._reply(pipe, req.request_id, reply, max(1, (req.deadline_ms - now_ms) // 1000))
            pipe.xack(self.keys.stream, GROUP, req.entry_id)
        for poison in dead:
            pipe.xadd(self.keys.dead, self._dead_record(poison.entry_id, poison.reason, poison.fields,
                                                        poison.deliveries), maxlen=DEAD_LETTER_MAXLEN, approximate=True)
            if poison.request_id is not None:
                error = Reply.failure("The request could not be processed by the workers; retrying it "
                                      "will not help. Report it if it persists.", poison.reason)
                replies[len(pipe)] = (poison.entry_id, poison.request_id)
                self._reply(pipe, poison.request_id, error, 0)
            pipe.xack(self.keys.stream, GROUP, poison.entry_id)
        trim_at = len(pipe)
        pipe.fcall(FN_TRIM_ANSWERED, 1, self.keys.stream, GROUP)
        # EXEC ran every command even where one failed: report those, never redo the transaction.
        outcome = pipe.execute(raise_on_error=False)
        unwritable = [replies[i] for i, out in enumerate(outcome) if i in replies and isinstance(out, Exception)]
        if unwritable:
            self._dead_letter_replies(unwritable)
        if isinstance(outcome[trim_at], redis.ResponseError) and _missing_function(outcome[trim_at]):
            load_functions(self.redis)  # answered entries are trimmed on the next completion

    def _dead_record(self, entry_id: bytes, reason: str, fields: dict[bytes, bytes], deliveries: int) -> dict[str, Any]:
        record: dict[str, Any] = {k.decode(errors="replace"): v for k, v in fields.items() if k != b"data"}
        record.update(entry=entry_id, reason=reason, worker=self.name, deliveries=deliveries,
                      data_bytes=len(fields.get(b"data", b"")))
        return record

    def _dead_letter_replies(self, unwritable: list[tuple[bytes, str]]) -> None:
        """Requests whose reply key is not a list (made so by someone else): already acknowledged."""
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, request_id in unwritable:
            reason = f"its reply key {self.keys.reply(request_id)} holds another type; the answer cannot be written"
            pipe.xadd(self.keys.dead, self._dead_record(entry_id, reason, {b"id": request_id.encode()}, 1),
                      maxlen=DEAD_LETTER_MAXLEN, approximate=True)
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
