"""A worker whose model call hangs must give its batch up, not keep heart-beating forever."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import redis

from inferstack.protocol import GROUP, Keys
from inferstack_worker.worker import EXIT_STALLED
from tests.helpers import digits_env, png_bytes, post, stack_log, wait_for

HOOKS = str(Path(__file__).parent / "hooks")
KEYS = Keys("inferstack")


def pending_of(r: redis.Redis, name: str) -> int:
    try:
        return next((c["pending"] for c in r.xinfo_consumers(KEYS.stream, GROUP) if c["name"].decode() == name), 0)
    except redis.ResponseError:
        return 0


def test_hung_model_call_gives_its_batch_to_another_worker_and_exits(make_stack, digits_model):
    env = digits_env(
        digits_model,
        PYTHONPATH=os.pathsep.join(filter(None, [HOOKS, os.environ.get("PYTHONPATH")])),
        INFERSTACK_TEST_HANG_VALUE="7",
        INFERSTACK_STALL_TIMEOUT_S="4",
        INFERSTACK_REQUEST_TIMEOUT_S="90",
        INFERSTACK_WEB_PROCESSES="1",
    )
    stack = make_stack(workers=0, env=env, wait=False)
    r = redis.Redis.from_url(stack.env["INFERSTACK_REDIS_URL"])
    stack.wait_ready(timeout_s=60, workers=0)  # web and Redis up; no worker needed
    innocents = [png_bytes(img) for img in digits_model["x_test"][:3]]
    hanger = png_bytes(np.full((32, 32, 3), 7, np.uint8))
    # Queued in this order before any worker runs, so the first worker takes all four as one batch.
    pool = ThreadPoolExecutor(4)
    futures = []
    for i, upload in enumerate([*innocents, hanger]):
        futures.append(pool.submit(post, stack, upload, timeout=120))
        wait_for(lambda: r.xlen(KEYS.stream) >= i + 1, what=f"request {i + 1} queued", interval=0.01)
    first = stack.start_worker()
    name = f"local-worker-1-{os.getpid()}"
    wait_for(lambda: first.poll() is not None or pending_of(r, name) >= 4, timeout=120,
             what="the first worker taking all four", explain=lambda: stack_log(stack))
    assert first.poll() is None, stack_log(stack)
    t_stuck = time.monotonic()
    # The hung worker notices within its stall bound and exits for a restart.
    assert first.wait(60) == EXIT_STALLED, stack_log(stack)
    stalled_after = time.monotonic() - t_stuck
    print(f"hung worker exited {stalled_after:.1f} s after taking the batch (bound 4 s)")
    assert stalled_after < 30, stalled_after
    # A second worker reclaims the batch one request at a time: the innocents are answered.
    stack.start_worker()
    answers = [f.result() for f in futures[:3]]
    assert [a.status_code for a in answers] == [200] * 3, stack_log(stack)
    assert "stalled" in stack_log(stack) and "reclaimed" in stack_log(stack)
    pool.shutdown(wait=False, cancel_futures=True)


def test_a_reply_redis_refuses_for_good_trips_the_watchdog_instead_of_retrying_forever(make_stack, digits_model):
    """Retrying a delivery counts as progress only while Redis is away or busy: a refusal that will
    never change (here NOPERM on RPUSH) ends the worker, and another one answers the request."""
    # A bound above the delivery retries' longest backoff (5 s, +20% jitter): only a loop that stops
    # counting its retries as progress can trip it.
    env = digits_env(digits_model, INFERSTACK_STALL_TIMEOUT_S="10", INFERSTACK_REQUEST_TIMEOUT_S="600",
                     INFERSTACK_WEB_PROCESSES="1")
    stack = make_stack(workers=0, env=env, wait=False)
    r = redis.Redis.from_url(stack.env["INFERSTACK_REDIS_URL"])
    stack.wait_ready(timeout_s=60, workers=0)
    first = stack.start_worker()
    stack.wait_ready(timeout_s=300, workers=1)
    r.execute_command("ACL", "SETUSER", "default", "-rpush")  # every reply refused, for good
    pool = ThreadPoolExecutor(1)
    answer = pool.submit(post, stack, png_bytes(digits_model["x_test"][0]), timeout=660)
    assert first.wait(120) == EXIT_STALLED, stack_log(stack)
    r.execute_command("ACL", "SETUSER", "default", "+rpush")
    stack.start_worker()
    assert answer.result().status_code == 200, stack_log(stack)
    pool.shutdown()
