"""The queue cap, seen by a client: all-or-nothing for multi-image requests, and counting only
requests that still wait (group lag + pending), not answered entries left in the stream.

Real redis-server, gunicorn and worker processes; batches are held on purpose (no worker at
all, or a worker whose model call hangs on a marker image: tests/worker/hooks).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import redis
import requests

from inferstack.contract.http import PREDICT_PATH
from inferstack.contract.settings import env_name
from inferstack.protocol import GROUP, Keys, QueueFull, WebQueue
from tests.helpers import digits_env, png_bytes, post, stack_log, wait_for

HOOKS = str(Path(__file__).parents[1] / "worker" / "hooks")
STREAM = Keys("inferstack").stream


def pending(r: redis.Redis) -> int:
    return int(r.xpending(STREAM, GROUP)["pending"])


def queue_depth_metric(url: str) -> int:
    text = requests.get(url + "/metrics", timeout=10).text
    (value,) = re.findall(r"^inferstack_queue_depth (\d+)", text, re.M)
    return int(value)


def test_a_multi_image_request_over_the_cap_queues_none_of_its_images(make_stack, digits_model):
    env = digits_env(digits_model, **{env_name("max_queue"): "10", env_name("request_timeout_s"): "5"})
    stack = make_stack(workers=0, env=env, wait=False)  # no worker: whatever is queued stays queued
    stack.wait_ready(timeout_s=60, workers=0)
    url = stack.env["INFERSTACK_REDIS_URL"]
    r = redis.Redis.from_url(url)
    waiting = WebQueue(url, "inferstack", max_queue=10, timeout_s=5)
    pixels = np.zeros((32, 32, 3), np.uint8)
    for _ in range(8):
        waiting.submit(pixels, top_k=1)
    assert r.xlen(STREAM) == 8
    upload = png_bytes(digits_model["x_test"][0])
    rsp = requests.post(stack.url + PREDICT_PATH, files=[("image", (f"{i}.png", upload)) for i in range(8)],
                        timeout=60)
    print(f"8 images waiting, cap 10: an 8-image request got {rsp.status_code}, XLEN now {r.xlen(STREAM)}")
    assert rsp.status_code == 503, rsp.text + stack_log(stack)
    assert rsp.json()["success"] is False and rsp.headers["Retry-After"]
    assert r.xlen(STREAM) == 8, "a refused request left some of its images in the queue"
    # Two images still fit under the cap.
    waiting.submit(pixels, top_k=1)
    waiting.submit(pixels, top_k=1)
    assert r.xlen(STREAM) == 10
    try:
        waiting.submit(pixels, top_k=1)
        raise AssertionError("an 11th image was queued past the cap of 10")
    except QueueFull:
        pass


def test_answered_entries_behind_a_held_batch_do_not_count_against_the_cap(make_stack, digits_model):
    cap = 4
    env = digits_env(digits_model, **{env_name("max_queue"): str(cap), env_name("request_timeout_s"): "600",
                                      env_name("web_processes"): "1"})
    stack = make_stack(workers=0, env=env, wait=False)
    r = redis.Redis.from_url(stack.env["INFERSTACK_REDIS_URL"])
    stack.wait_ready(timeout_s=60, workers=0)
    # Worker 1 takes the marker image and hangs in its model call: that entry stays pending.
    hook = {"PYTHONPATH": os.pathsep.join(filter(None, [HOOKS, os.environ.get("PYTHONPATH")])),
            "INFERSTACK_TEST_HANG_VALUE": "7", env_name("stall_timeout_s"): "600"}
    held = stack.start_worker(hook)
    pool = ThreadPoolExecutor(1)
    marker = pool.submit(post, stack, png_bytes(np.full((32, 32, 3), 7, np.uint8)), timeout=660)
    wait_for(lambda: held.poll() is not None or pending(r) == 1, timeout=120, what="the marker taken",
             explain=lambda: stack_log(stack))
    stack.start_worker()
    stack.wait_ready(timeout_s=120, workers=2)
    # Worker 2 answers twice the cap, one after the other; each stays in the stream behind the held
    # entry (answered entries are trimmed from the head only), yet none of them is waiting.
    for index in range(2 * cap):
        rsp = post(stack, png_bytes(digits_model["x_test"][index]))
        assert rsp.status_code == 200, f"request {index + 1} (XLEN {r.xlen(STREAM)}): {rsp.status_code} {rsp.text}"
    print(f"cap {cap}: {2 * cap} answered behind a held one: XLEN {r.xlen(STREAM)}, "
          f"inferstack_queue_depth {queue_depth_metric(stack.url)}")
    assert r.xlen(STREAM) == 2 * cap + 1 and pending(r) == 1
    assert queue_depth_metric(stack.url) == 1
    # The held batch was a hang, not lost work: once its worker dies, the other one answers it.
    held.kill()
    assert marker.result().status_code == 200, stack_log(stack)
    wait_for(lambda: r.xlen(STREAM) == 0, what="answered entries trimmed")
    assert queue_depth_metric(stack.url) == 0
    pool.shutdown()
