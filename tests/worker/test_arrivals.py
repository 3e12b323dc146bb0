"""A worker's arrival subscription must not let notices pile up in Redis while nobody reads them.

Every enqueue publishes one notice on the arrivals channel; a worker listens only while it fills
a batch. Outside that window (idle in XREADGROUP, or busy in the model) a subscription left open
would make Redis buffer every notice for that client (CLIENT LIST ``omem``), unbounded.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import redis

from inferstack.contract.settings import env_name
from inferstack.protocol import GROUP, Keys, WebQueue
from tests.helpers import digits_env, png_bytes, post, stack_log, wait_for

HOOKS = str(Path(__file__).parent / "hooks")
KEYS = Keys("inferstack")
NOTICES = 10_000
# 1 KiB each (the publisher picks the payload; the workers' own notices are tiny): 10 MiB in all,
# more than the kernel's socket buffers absorb (~4 MiB), so what nobody reads must sit in Redis.
PAYLOAD = "1" * 1024
# What a handful of notices in flight may hold; the burst would take megabytes.
SMALL_BYTES = 64 * 1024


def client_memory(r: redis.Redis) -> int:
    """The largest output buffer (omem) and total memory (tot-mem) of any subscribed client."""
    subscribed = [c for c in r.client_list() if int(c.get("sub", 0)) or int(c.get("psub", 0))]
    return max([max(int(c["omem"]), int(c.get("tot-mem", 0))) for c in subscribed], default=0)


def publish_burst(r: redis.Redis) -> None:
    pipe = r.pipeline(transaction=False)
    for _ in range(NOTICES):
        pipe.publish(KEYS.arrivals, PAYLOAD)
    pipe.execute()


def test_arrival_notices_do_not_pile_up_while_the_worker_is_idle_or_busy(make_stack, digits_model):
    env = digits_env(digits_model, **{
        "PYTHONPATH": os.pathsep.join(filter(None, [HOOKS, os.environ.get("PYTHONPATH")])),
        "INFERSTACK_TEST_SLOW_VALUE": "7", "INFERSTACK_TEST_SLOW_S": "600",
        env_name("request_timeout_s"): "60", env_name("web_processes"): "1", env_name("max_batch_delay_ms"): "50",
    })
    stack = make_stack(workers=0, env=env, wait=False)
    url = stack.env["INFERSTACK_REDIS_URL"]
    r = redis.Redis.from_url(url)
    stack.wait_ready(timeout_s=60, workers=0)
    # Three requests queued before the worker starts: it finds a backlog and opens a batch window.
    queue = WebQueue(url, "inferstack", max_queue=100, timeout_s=60)
    pixels = np.zeros((32, 32, 3), np.uint8)
    ids = [queue.submit(pixels, top_k=1) for _ in range(3)]
    worker = stack.start_worker()
    # The first answer waits for the worker's model load (a minute on a busy machine).
    assert all(queue.wait(i, 300)["ok"] for i in ids), stack_log(stack)

    publish_burst(r)  # idle: the worker blocks in XREADGROUP
    idle = client_memory(r)

    pool = ThreadPoolExecutor(1)
    slow = pool.submit(post, stack, png_bytes(np.full((32, 32, 3), 7, np.uint8)), timeout=120)
    wait_for(lambda: int(r.xpending(KEYS.stream, GROUP)["pending"]) == 1, what="the slow request taken")
    publish_burst(r)  # busy: the worker is inside its model call
    busy = client_memory(r)
    print(f"subscriber memory after {NOTICES} notices: idle {idle} B, busy {busy} B")
    assert idle < SMALL_BYTES and busy < SMALL_BYTES, (idle, busy, stack_log(stack))
    worker.kill()  # the slow call would take 600 s; nothing else is asked of it
    pool.shutdown(wait=False, cancel_futures=True)
    del slow
