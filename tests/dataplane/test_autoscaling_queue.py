"""What KEDA sees and what a user sees when the workers are scaled to zero (real Redis, real processes).

KEDA's redis-streams scaler in lag mode reads ``XINFO GROUPS <stream>`` and takes the group's
``lag``; a NULL lag (Redis cannot tell) reaches it as 0, which would let it scale away workers
while requests wait. These tests read the lag the same way.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from inferstack.protocol import GROUP, Keys, WebQueue, WorkerQueue
from tests.helpers import DIGIT_LABELS, digits_env, png_bytes, post, stack_log, wait_for
from tools.devstack import LocalStack, free_port

PREFIX = "inferstack"
STREAM = Keys(PREFIX).stream


def keda_lag(r: redis.Redis) -> int | None:
    for group in r.xinfo_groups(STREAM):
        if group["name"].decode() == GROUP:
            return group["lag"]
    raise AssertionError(f"no consumer group {GROUP!r} on {STREAM}")


def pending(r: redis.Redis) -> int:
    return int(r.xpending(STREAM, GROUP)["pending"])


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    stack = LocalStack(log_dir=str(tmp_path_factory.mktemp("redis-logs")))
    stack.start_redis()
    yield stack.env["INFERSTACK_REDIS_URL"]
    stack.stop_redis()


def answer(worker: WorkerQueue, batch: list) -> None:
    worker.complete([(req, {"ok": True, "predictions": [], "model": "m"}) for req in batch], worker.now_ms())


def test_lag_is_the_requests_no_worker_has_taken(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    web = WebQueue(redis_url, PREFIX, max_queue=100, timeout_s=30)
    web.ensure_group()  # the web tier does this at start-up, before any worker ever ran
    web.ensure_group()  # and again on every readiness probe: idempotent
    assert keda_lag(r) == 0
    pixels = np.zeros((4, 4, 3), np.uint8)
    ids = [web.submit(pixels, 1) for _ in range(10)]
    assert keda_lag(r) == 10, "queued before any worker: KEDA must see every one"

    a, b = WorkerQueue(redis_url, PREFIX, "a"), WorkerQueue(redis_url, PREFIX, "b")
    held_by_a = a.take_batch(5, 0)
    assert len(held_by_a) == 5 and keda_lag(r) == 5 and pending(r) == 5
    held_by_b = b.take_batch(3, 0)
    assert keda_lag(r) == 2 and pending(r) == 8
    # b finishes first while a still holds older requests (workers finish out of order). Deleting
    # b's entries with XDEL would leave Redis unable to count: lag NULL, read by KEDA as 0.
    answer(b, held_by_b)
    assert keda_lag(r) == 2 and pending(r) == 5
    ids.append(web.submit(pixels, 1))
    assert keda_lag(r) == 3
    more = b.take_batch(8, 0)
    assert len(more) == 3 and keda_lag(r) == 0
    answer(b, more)
    assert keda_lag(r) == 0
    ids.append(web.submit(pixels, 1))
    assert keda_lag(r) == 1
    answer(a, held_by_a)
    assert keda_lag(r) == 1 and pending(r) == 0
    answer(a, a.take_batch(8, 0))
    assert keda_lag(r) == 0 and pending(r) == 0
    # Every request answered, and nothing answered stays in the stream (Redis memory).
    assert all(web.wait(i, 1)["ok"] for i in ids)
    assert r.xlen(STREAM) == 0


def test_zero_workers_ready_then_a_late_worker_answers_the_queued_request(make_stack, digits_model) -> None:
    stack = make_stack(workers=0, wait=False, env=digits_env(digits_model, INFERSTACK_REQUEST_TIMEOUT_S="120"))
    stack.wait_ready(timeout_s=60, workers=0)
    rsp = requests.get(stack.url + "/readyz", timeout=10)
    # Ready with no worker at all: the pod can accept and queue work; the body says who serves it.
    assert rsp.json() == {"ready": True, "workers": 0}
    r = redis.Redis.from_url(stack.env["INFERSTACK_REDIS_URL"])
    assert keda_lag(r) == 0, "the web tier created the stream and group: KEDA can read the lag"

    upload = png_bytes(digits_model["x_test"][0])
    result: dict[str, requests.Response] = {}
    client = threading.Thread(target=lambda: result.update(rsp=post(stack, upload, timeout=150)))
    client.start()
    wait_for(lambda: not client.is_alive() or keda_lag(r) == 1, what="the request queued", interval=0.02)
    assert client.is_alive(), result
    time.sleep(0.5)  # queued a while: KEDA's lag > 0 is what would start the first worker

    metrics_port = free_port()
    started = time.monotonic()
    stack.start_worker(env={"INFERSTACK_METRICS_PORT": str(metrics_port)})
    client.join(150)
    answered_after = time.monotonic() - started
    rsp = result["rsp"]
    assert rsp.status_code == 200, f"{rsp.text}\n{stack_log(stack)}"
    assert rsp.json()["predictions"][0]["label"] in DIGIT_LABELS
    print(f"worker start to first answer: {answered_after:.1f} s")
    assert keda_lag(r) == 0 and r.xlen(STREAM) == 0
    assert requests.get(stack.url + "/readyz", timeout=5).json() == {"ready": True, "workers": 1}

    # The worker's own metrics: one batch of one request that waited in the queue >= 0.5 s.
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    model = {"model": "digits"}  # the served model name (INFERSTACK_MODEL_NAME, else the file stem)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({**model, **labels}.items())))]

    assert value("inferstack_batch_size_count") == 1 and value("inferstack_batch_size_sum") == 1
    assert value("inferstack_queue_wait_seconds_count") == 1
    assert value("inferstack_queue_wait_seconds_sum") >= 0.5
    assert value("inferstack_inference_seconds_count") == 1
    assert value("inferstack_worker_requests_processed_total") == 1
    assert value("inferstack_worker_requests_failed_total") == 0
    assert value("inferstack_worker_requests_reclaimed_total") == 0
