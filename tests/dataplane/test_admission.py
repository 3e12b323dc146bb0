"""Admission on Redis memory, straight against a real redis-server (no web or worker needed)."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from tools.devstack import LocalStack
from inferstack.protocol import RedisFull, WebQueue


@pytest.fixture(scope="module")
def redis_url():
    stack = LocalStack()
    stack.start_redis()
    yield stack.env["INFERSTACK_REDIS_URL"]
    stack.stop_redis()


PIXELS = np.zeros((8, 8, 3), np.uint8)


def test_refuses_before_redis_is_full_and_accepts_again(redis_url):
    r = redis.Redis.from_url(redis_url)
    queue = WebQueue(redis_url, "adm", max_queue=100, timeout_s=1)
    used = int(r.info("memory")["used_memory"])
    # Not yet full, but within 10% of the limit: refused, so the workers' replies still fit.
    r.config_set("maxmemory", int(used / 0.95))
    try:
        with pytest.raises(RedisFull):
            queue.submit(PIXELS, 1)
    finally:
        r.config_set("maxmemory", 0)
    queue.check_memory(every_s=0)  # a fresh reading, as the next request would get 0.5 s later
    assert queue.submit(PIXELS, 1)


def test_without_permission_for_info_admission_falls_back_to_redis_refusal(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.acl_setuser("web", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all", "-info"])
    url = redis_url.replace("redis://", "redis://web:pw@")
    queue = WebQueue(url, "adm2", max_queue=100, timeout_s=1)
    assert queue.submit(PIXELS, 1)  # no INFO: admission is skipped, not every request refused
    r.config_set("maxmemory", 1)
    try:
        with pytest.raises(RedisFull):
            queue.submit(PIXELS, 1)  # Redis' own OOM refusal is still reported as "full"
    finally:
        r.config_set("maxmemory", 0)
