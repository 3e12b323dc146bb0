"""The messages that cross Redis, each with its wire shape in one place (to_wire / from_wire).

QueueEntry: one request in the stream (web -> worker). Reply: one answer in a reply list
(worker -> web). ModelRecord: what the workers serve, under the model key (worker -> web).
Standard library only: pixels and probabilities travel as bytes here; numpy views of them
belong to inferstack.protocol.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Version of the request entry format. Entries without a version field are version 1 (same
# fields); a worker refuses versions it does not know instead of guessing at their fields.
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
REQUEST_ID = re.compile(rb"^[0-9A-Za-z_-]{1,64}$")
MAX_SIDE = 4096

# Stream fields of a QueueEntry. The enqueue script adds DEADLINE_FIELD from the Redis clock.
VERSION_FIELD = "v"
ID_FIELD = "id"
DEADLINE_FIELD = "deadline_ms"
DATA_FIELD = "data"
PROBS_FIELD = "probs"


class EntryError(ValueError):
    """A stream entry that no worker can serve; ``request_id`` is set when its client can be told."""

    def __init__(self, reason: str, request_id: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


@dataclass(frozen=True)
class QueueEntry:
    """One queued image: raw uint8 pixels (height x width x channels) and what to answer."""

    request_id: str
    height: int
    width: int
    channels: int
    top_k: int
    data: bytes
    probabilities: bool = False  # the client wants every class's probability (v2), not only the top k
    deadline_ms: int | None = None  # Redis clock; set by the enqueue script, not by the web tier

    def to_wire(self) -> list[Any]:
        """The stream fields, flat (field, value, ...), without the deadline the script adds."""
        return [VERSION_FIELD, PROTOCOL_VERSION, ID_FIELD, self.request_id, "h", self.height, "w", self.width,
                "c", self.channels, "top_k", self.top_k, PROBS_FIELD, "1" if self.probabilities else "0",
                DATA_FIELD, self.data]

    @classmethod
    def from_wire(cls, fields: Mapping[bytes, bytes]) -> QueueEntry:
        """A stream entry's fields -> QueueEntry; raises EntryError saying why it cannot be served."""
        raw_id = fields.get(ID_FIELD.encode(), b"")
        request_id = raw_id.decode() if REQUEST_ID.match(raw_id) else None
        raw_version = fields.get(VERSION_FIELD.encode(), b"1")
        try:
            version = int(raw_version)
        except ValueError:
            version = -1
        if version not in SUPPORTED_VERSIONS:
            raise EntryError(f"unsupported protocol version {raw_version[:16]!r} "
                             f"(this worker reads {sorted(SUPPORTED_VERSIONS)})", request_id)
        if request_id is None:
            raise EntryError(f"missing or malformed request id {raw_id[:80]!r}", None)
        try:
            return cls._checked(fields, request_id)
        except KeyError as exc:
            raise EntryError(f"missing field {exc.args[0]!r}", request_id) from None
        except (ValueError, TypeError) as exc:
            raise EntryError(f"malformed entry: {str(exc)[:200]}", request_id) from None

    @classmethod
    def _checked(cls, fields: Mapping[bytes, bytes], request_id: str) -> QueueEntry:
        h, w, c = int(fields[b"h"]), int(fields[b"w"]), int(fields[b"c"])
        if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE and c in (1, 3)):
            raise ValueError(f"bad image shape {h}x{w}x{c}")
        data = fields[DATA_FIELD.encode()]
        if len(data) != h * w * c:
            raise ValueError(f"{len(data)} bytes of pixels for a {h}x{w}x{c} image")
        return cls(request_id=request_id, height=h, width=w, channels=c, top_k=int(fields[b"top_k"]), data=data,
                   probabilities=fields.get(PROBS_FIELD.encode()) == b"1",
                   deadline_ms=int(fields[DEADLINE_FIELD.encode()]))


@dataclass(frozen=True)
class Reply:
    """A worker's answer to one request: predictions, or an error a client can read."""

    ok: bool
    predictions: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None
    probabilities: str | None = None  # base64 of float32 little-endian, every class (v2 only)
    error: str | None = None
    reason: str | None = None  # why a dead-lettered entry could not be served (for the logs)

    @classmethod
    def failure(cls, error: str, reason: str | None = None) -> Reply:
        return cls(ok=False, error=error, reason=reason)

    def to_wire(self) -> str:
        if not self.ok:
            body: dict[str, Any] = {"ok": False, "error": self.error}
            if self.reason is not None:
                body["reason"] = self.reason
            return json.dumps(body)
        body = {"ok": True, "predictions": self.predictions, "model": self.model}
        if self.probabilities is not None:
            body["probabilities"] = self.probabilities
        return json.dumps(body)

    @classmethod
    def from_wire(cls, raw: bytes | str) -> Reply:
        body = json.loads(raw)
        if not body.get("ok"):
            return cls(ok=False, error=body.get("error"), reason=body.get("reason"))
        return cls(ok=True, predictions=body["predictions"], model=body.get("model"),
                   probabilities=body.get("probabilities"))


@dataclass(frozen=True)
class ModelRecord:
    """The model the workers serve, as they advertise it under the model key."""

    name: str
    input_shape: tuple[int, int, int]
    classes: int
    labels: tuple[str, ...] = ()
    runtime: str = ""
    precision: str = ""
    # precision auto: the timed candidates and the choice; auto int8: its state and why (JSON object).
    precision_choice: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> str:
        # Labels let the web tier answer the v2 classification extension from a probability vector.
        return json.dumps({"name": self.name, "input_shape": list(self.input_shape), "classes": self.classes,
                           "labels": list(self.labels), "runtime": self.runtime, "precision": self.precision,
                           "precision_choice": dict(self.precision_choice)})

    @classmethod
    def from_wire(cls, raw: bytes | str) -> ModelRecord:
        body = json.loads(raw)
        h, w, c = body["input_shape"]
        return cls(name=body["name"], input_shape=(int(h), int(w), int(c)), classes=int(body["classes"]),
                   labels=tuple(body.get("labels") or ()), runtime=body.get("runtime", ""),
                   precision=body.get("precision", ""), precision_choice=body.get("precision_choice") or {})
