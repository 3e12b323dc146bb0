"""Entries no worker can serve: malformed, from another protocol version, or failing every delivery.

Real redis-server, real worker processes, real gunicorn; the bad entries are written straight
into the stream, as a rogue writer or a web pod of another release would.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import redis
import requests

from inferstack.protocol import GROUP, MAX_DELIVERIES, Keys, ensure_group
from tests.helpers import digits_env, png_bytes, post, stack_log, wait_for

KEYS = Keys("inferstack")


def dead_letters(r: redis.Redis) -> list[dict[bytes, bytes]]:
    return [fields for _id, fields in r.xrange(KEYS.dead)]


def test_malformed_entries_are_dead_lettered_and_workers_keep_serving(make_stack, digits_model):
    stack = make_stack(workers=1, env=digits_env(digits_model, INFERSTACK_WEB_PROCESSES="1"))
    r = redis.Redis.from_url(stack.env["INFERSTACK_REDIS_URL"])
    upload = png_bytes(digits_model["x_test"][0])
    assert post(stack, upload).status_code == 200
    worker = stack.workers[0]

    good = {"id": "x", "h": 32, "w": 32, "c": 3, "top_k": 1, "deadline_ms": 2**50, "data": b"\0" * 3072}
    r.xadd(KEYS.stream, {"junk": "no fields we know"})
    r.xadd(KEYS.stream, {**good, "id": "missing0h", "h": "not-a-number"})
    r.xadd(KEYS.stream, {**good, "id": "future0v", "v": 99})
    r.xadd(KEYS.stream, {**good, "id": "short0data", "data": b"\0" * 10})
    r.xadd(KEYS.stream, {k: v for k, v in good.items() if k != "top_k"} | {"id": "no0topk"})
    # A well-formed request behind them is still answered.
    resp = post(stack, upload)
    assert resp.status_code == 200, (resp.text, stack_log(stack))

    wait_for(lambda: r.xlen(KEYS.dead) == 5, what="five dead letters")
    assert worker.poll() is None, stack_log(stack)
    reasons = {f.get(b"id", b"").decode(): f[b"reason"].decode() for f in dead_letters(r)}
    assert "field" in reasons[""] or "request id" in reasons[""]
    assert "protocol version" in reasons["future0v"]
    assert "malformed" in reasons["missing0h"] and "malformed" in reasons["short0data"]
    assert "top_k" in reasons["no0topk"]
    assert all(f[b"worker"] for f in dead_letters(r))
    # Acknowledged and removed: nothing left for a worker to trip on after a restart.
    assert r.xlen(KEYS.stream) == 0
    assert r.xpending(KEYS.stream, GROUP)["pending"] == 0
    # Each entry that names its client got an error reply at once.
    for request_id in ("future0v", "short0data", "missing0h", "no0topk"):
        reply = json.loads(r.lpop(KEYS.reply(request_id)))
        assert reply["ok"] is False and reply["error"], reply


def held_request(make_stack, digits_model, consumer: str, worker_name: str | None = None):
    """A stack whose one queued request Redis says `consumer` already took MAX_DELIVERIES times;
    then a worker starts. Returns (redis client, the entry id, the client's response)."""
    stack = make_stack(workers=0, env=digits_env(digits_model, INFERSTACK_WEB_PROCESSES="1"), wait=False)
    r = redis.Redis.from_url(stack.env["INFERSTACK_REDIS_URL"])
    wait_for(lambda: _up(stack), what="the web server")
    ensure_group(r, KEYS.stream)  # the web tier made it at start-up already; idempotent
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, stack, png_bytes(digits_model["x_test"][1]))
        wait_for(lambda: r.xlen(KEYS.stream) == 1, what="the request to be queued")
        got = r.xreadgroup(GROUP, consumer, {KEYS.stream: ">"}, count=1)
        entry_id = got[0][1][0][0]
        r.execute_command("XCLAIM", KEYS.stream, GROUP, consumer, 0, entry_id, "RETRYCOUNT", MAX_DELIVERIES)
        stack.start_worker(env={"INFERSTACK_WORKER_NAME": worker_name} if worker_name else None)
        resp = answer.result(120)
    return stack, r, entry_id, resp


def test_request_failing_every_delivery_is_dead_lettered_and_its_client_told(make_stack, digits_model):
    # Delivery counts come from Redis: a request a (now dead) worker already held MAX_DELIVERIES
    # times is not handed to the model again; its client gets a 500 JSON at once.
    stack, r, entry_id, resp = held_request(make_stack, digits_model, "crashed-worker")
    assert resp.status_code == 500, (resp.text, stack_log(stack))
    assert resp.json()["success"] is False and "could not be processed" in resp.json()["error"]
    letters = dead_letters(r)
    assert len(letters) == 1 and letters[0][b"entry"] == entry_id
    assert f"handed out {MAX_DELIVERIES + 1} times".encode() in letters[0][b"reason"]
    assert r.xlen(KEYS.stream) == 0


def test_restarted_worker_counts_its_own_backlog_deliveries(make_stack, digits_model):
    # A worker that keeps crashing on a request re-reads it from its own backlog after each
    # restart: those hand-outs count too, so the loop ends in the dead-letter stream.
    stack, r, entry_id, resp = held_request(make_stack, digits_model, "pod-0", worker_name="pod-0")
    assert resp.status_code == 500, (resp.text, stack_log(stack))
    assert [f[b"entry"] for f in dead_letters(r)] == [entry_id]
    # ... and the same worker then serves new requests normally.
    assert post(stack, png_bytes(digits_model["x_test"][3])).status_code == 200


def _up(stack) -> bool:
    try:
        return requests.get(stack.url + "/healthz", timeout=1).status_code == 200
    except requests.RequestException:  # refused, or accepted but not yet served
        return False
