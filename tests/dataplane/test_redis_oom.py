"""Redis at maxmemory: the web tier answers 503 + Retry-After, the worker waits it out, nothing is lost."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import redis
import requests

from inferstack.protocol import GROUP, Keys
from tests.helpers import digits_env, png_bytes, post, stack_log, wait_for

HOOKS = str(Path(__file__).parents[1] / "worker" / "hooks")
KEYS = Keys("inferstack")


def test_redis_out_of_memory_503_worker_survives_and_recovers(make_stack, digits_model):
    stack = make_stack(
        workers=1,
        env=digits_env(digits_model, PYTHONPATH=os.pathsep.join(filter(None, [HOOKS, os.environ.get("PYTHONPATH")])), INFERSTACK_TEST_SLOW_VALUE="9", INFERSTACK_TEST_SLOW_S="3",
                       INFERSTACK_REQUEST_TIMEOUT_S="40", INFERSTACK_WEB_PROCESSES="1"),
    )
    r = redis.Redis.from_url(stack.env["INFERSTACK_REDIS_URL"])
    worker = stack.workers[0]
    upload = png_bytes(digits_model["x_test"][0])
    assert post(stack, upload).status_code == 200

    # 1. Redis refuses writes: new requests get 503 with Retry-After at once, as JSON.
    r.config_set("maxmemory", 1)
    t0 = time.monotonic()
    full = post(stack, upload)
    assert full.status_code == 503, full.text
    assert time.monotonic() - t0 < 5
    assert int(full.headers["Retry-After"]) >= 1
    assert full.json()["success"] is False and "capacity" in full.json()["error"]
    assert requests.get(stack.url + "/healthz", timeout=10).status_code == 200

    # 2. A request accepted before Redis filled up: its reply is refused while Redis is full,
    # the worker keeps it pending and retries, and the client gets its answer after recovery.
    r.config_set("maxmemory", 0)
    time.sleep(1.0)  # past the web tier's cached memory reading
    answer: dict[str, requests.Response] = {}
    slow = png_bytes(np.full((32, 32, 3), 9, np.uint8))  # the worker takes 3 s on this one
    client = threading.Thread(target=lambda: answer.setdefault("r", post(stack, slow)))
    client.start()
    name = f"local-worker-1-{os.getpid()}"
    wait_for(lambda: any(c["pending"] for c in r.xinfo_consumers(KEYS.stream, GROUP) if c["name"].decode() == name),
             timeout=30, what="the worker holding the request", interval=0.01)
    r.config_set("maxmemory", 1)  # before the worker finishes its 3 s batch
    time.sleep(6)
    assert worker.poll() is None, stack_log(stack)
    assert client.is_alive(), "the client was answered while Redis could not store the reply"
    r.config_set("maxmemory", 0)
    client.join(60)
    assert answer["r"].status_code == 200, (answer["r"].text, stack_log(stack))
    assert "maxmemory" in stack_log(stack)  # the worker saw the refusal and retried

    # 3. Recovered: new requests are served by the same processes.
    time.sleep(1.0)
    assert post(stack, upload).status_code == 200
    assert worker.poll() is None
    assert r.xlen(KEYS.stream) == 0
