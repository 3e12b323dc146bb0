"""The messages that cross Redis: what to_wire writes, from_wire reads back, and what it refuses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from inferstack.contract.messages import EntryError, ModelRecord, QueueEntry, Reply
from inferstack.contract.queue import Keys


def wire_fields(entry: QueueEntry, deadline_ms: int = 123) -> dict[bytes, bytes]:
    """The entry as Redis hands it to a worker: bytes fields, plus the deadline the enqueue script adds."""
    flat = entry.to_wire() + ["deadline_ms", deadline_ms]
    pairs = zip(flat[::2], flat[1::2])
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in pairs}


def test_queue_entry_round_trip():
    entry = QueueEntry("abc_1", 2, 3, 3, top_k=4, data=bytes(range(18)), probabilities=True)
    back = QueueEntry.from_wire(wire_fields(entry, 99))
    assert back == QueueEntry("abc_1", 2, 3, 3, 4, bytes(range(18)), True, deadline_ms=99)


@pytest.mark.parametrize("change, reason, told", [
    ({b"v": b"99"}, "unsupported protocol version", True),
    ({b"id": b"bad id!"}, "request id", False),
    ({b"h": b"tall"}, "malformed entry", True),
    ({b"data": b"\0" * 5}, "malformed entry", True),
    ({b"c": b"4"}, "bad image shape", True),
])
def test_entries_no_worker_can_serve_say_why(change, reason, told):
    fields = wire_fields(QueueEntry("req1", 2, 3, 3, 1, bytes(18))) | change
    with pytest.raises(EntryError) as info:
        QueueEntry.from_wire(fields)
    assert reason in info.value.reason
    assert (info.value.request_id == "req1") is told


def test_missing_field_is_named():
    fields = wire_fields(QueueEntry("req1", 2, 3, 3, 1, bytes(18)))
    del fields[b"top_k"]
    with pytest.raises(EntryError, match="missing field b'top_k'"):
        QueueEntry.from_wire(fields)


def test_replies_round_trip_and_failures_carry_no_predictions():
    ok = Reply(ok=True, predictions=[{"label": "tabby", "probability": 0.5}], model="m", probabilities="AAAA")
    assert Reply.from_wire(ok.to_wire()) == ok
    assert "probabilities" not in json.loads(Reply(ok=True, predictions=[], model="m").to_wire())
    failed = Reply.failure("The model failed on this image.", "bad shape")
    assert json.loads(failed.to_wire()) == {"ok": False, "error": "The model failed on this image.", "reason": "bad shape"}
    assert Reply.from_wire(failed.to_wire()) == failed


def test_model_record_round_trip():
    record = ModelRecord("digits", (32, 32, 3), 10, tuple("abcdefghij"), "keras", "fp32")
    assert ModelRecord.from_wire(record.to_wire()) == record
    # A record from a worker that sends no labels still reads.
    assert ModelRecord.from_wire(json.dumps({"name": "m", "input_shape": [4, 4, 3], "classes": 2})).labels == ()


def test_key_names():
    keys = Keys("p")
    assert (keys.stream, keys.dead, keys.workers, keys.model, keys.arrivals, keys.reply("r")) == (
        "p:requests", "p:dead", "p:workers", "p:model", "p:arrivals", "p:reply:r")
    assert Keys().stream == "inferstack:requests"


def data_plane_packages_loaded_by(imports: str) -> str:
    code = f"import sys, {imports}; print(sorted(m for m in ('numpy', 'redis', 'PIL', 'flask') if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_the_contract_and_the_operator_load_without_the_data_plane_packages():
    # The operator image installs only the operator extra: no numpy, redis, Pillow or Flask there.
    assert data_plane_packages_loaded_by("inferstack.contract, inferstack.contract.acl, inferstack.contract.media") == "[]"
    assert data_plane_packages_loaded_by("inferstack_operator.handlers, inferstack_operator.builders") == "[]"
