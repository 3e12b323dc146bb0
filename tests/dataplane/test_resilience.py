"""Failures a user will meet: a worker killed mid-batch, Redis restarting, overload, no workers."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis
import requests

from inferstack.protocol import GROUP, Keys
from tests.helpers import digits_env, png_bytes, post, stack_log, wait_for

KEYS = Keys("inferstack")


def holds_requests(r: redis.Redis, name: str) -> bool:
    try:
        return any(c["name"].decode() == name and c["pending"] > 0
                   for c in r.xinfo_consumers(Keys("inferstack").stream, GROUP))
    except redis.ResponseError:
        return False  # the stream does not exist yet


def signal_when_busy(r: redis.Redis, proc, name: str, sig: int, done: threading.Event) -> threading.Thread:
    """In the background: as soon as worker `name` holds unacknowledged requests, signal it.

    For SIGKILL the worker is frozen first and checked again: it cannot finish its batch between
    our check and the kill, so it dies holding requests (the survivor must reclaim them).
    """

    def signalled() -> bool:
        if not holds_requests(r, name):
            return False
        if sig != signal.SIGKILL:
            proc.send_signal(sig)
            return True
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.05)  # let Redis apply a reply transaction already on the wire
        if holds_requests(r, name):
            proc.send_signal(sig)
            return True
        proc.send_signal(signal.SIGCONT)
        return False

    def watch() -> None:
        try:
            wait_for(signalled, timeout=60, what=f"{name} holding requests", interval=0.002)
        except AssertionError:
            return  # never busy: done stays unset, and the test says so
        done.set()

    t = threading.Thread(target=watch)
    t.start()
    return t


def test_worker_sigkilled_mid_batch_loses_no_request(make_stack, photos):
    # A model slow enough that batches are in flight most of the time.
    stack = make_stack(
        workers=2,
        env={
            "INFERSTACK_MODEL": "MobileNetV3Small",
            "INFERSTACK_WEIGHTS": "none",
            "INFERSTACK_BATCH_SIZE": "8",
            "INFERSTACK_MAX_BATCH_DELAY_MS": "20",
        },
    )
    r = redis.Redis.from_url(stack.env["INFERSTACK_REDIS_URL"])
    keys = Keys("inferstack")
    victim = stack.workers[0]
    victim_name = f"local-worker-1-{os.getpid()}"
    uploads = [photos[name] for name in sorted(photos)] * 16  # 64 requests

    killed = threading.Event()
    t = signal_when_busy(r, victim, victim_name, signal.SIGKILL, killed)
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda u: post(stack, u), uploads))
    t.join()
    assert killed.is_set(), "the victim never held a batch"
    assert victim.wait(5) == -signal.SIGKILL
    codes = [resp.status_code for resp in responses]
    assert codes == [200] * len(uploads), (codes, stack_log(stack))
    assert all(resp.json()["success"] for resp in responses)
    # Nothing left behind: every entry was answered and acknowledged by the survivor.
    assert r.xlen(keys.stream) == 0
    assert "reclaimed" in stack_log(stack)


def test_redis_restart_503_then_recovers_without_restarting_processes(make_stack, digits_model):
    stack = make_stack(workers=1, env=digits_env(digits_model))
    upload = png_bytes(digits_model["x_test"][0])
    assert post(stack, upload).status_code == 200
    web_pid, worker_pid = stack.web.pid, stack.workers[0].pid

    stack.stop_redis()
    t0 = time.monotonic()
    down = post(stack, upload, timeout=30)
    elapsed = time.monotonic() - t0
    assert down.status_code == 503, down.text
    assert down.headers.get("Retry-After")
    assert down.json()["success"] is False and "unreachable" in down.json()["error"]
    assert elapsed < 5, f"503 took {elapsed:.1f} s"
    assert requests.get(stack.url + "/readyz", timeout=10).status_code == 503
    assert requests.get(stack.url + "/healthz", timeout=10).status_code == 200

    stack.start_redis()  # same port, empty data
    wait_for(lambda: post(stack, upload, timeout=10).status_code == 200, timeout=30, interval=0.5,
             what="/predict answering 200 after Redis came back", explain=lambda: stack_log(stack))
    assert stack.web.pid == web_pid and stack.web.poll() is None
    assert stack.workers[0].pid == worker_pid and stack.workers[0].poll() is None


def test_queue_full_503_and_timeout_504_without_workers(make_stack, digits_model):
    stack = make_stack(
        workers=0,
        env=digits_env(digits_model, INFERSTACK_MAX_QUEUE="2", INFERSTACK_REQUEST_TIMEOUT_S="4",
                       INFERSTACK_WEB_PROCESSES="1"),
        wait=False,
    )
    stack.wait_ready(timeout_s=60, workers=0)  # web and Redis up; no worker needed
    # No worker, still ready: requests queue (and would start a worker under KEDA).
    assert requests.get(stack.url + "/readyz", timeout=5).json() == {"ready": True, "workers": 0}
    upload = png_bytes(digits_model["x_test"][0])
    r = redis.Redis.from_url(stack.env["INFERSTACK_REDIS_URL"])
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(post, stack, upload) for _ in range(2)]
        wait_for(lambda: r.xlen(KEYS.stream) >= 2, what="two requests queued", interval=0.01)
        t0 = time.monotonic()
        full = post(stack, upload)
        assert time.monotonic() - t0 < 1.0, "a full queue must answer at once"
        assert full.status_code == 503
        assert full.headers["Retry-After"] == "1"
        assert "queue full" in full.json()["error"]
        timed_out = [f.result() for f in waiting]
    for resp in timed_out:
        assert resp.status_code == 504
        assert resp.json() == {"success": False, "error": resp.json()["error"]}
        assert "No result within 4 s" in resp.json()["error"]
    # A worker arriving later drops the two expired requests without computing or answering them.
    stack.start_worker()
    wait_for(lambda: r.xlen(KEYS.stream) == 0, timeout=120, interval=0.1, what="the expired requests dropped")
    assert not r.keys(KEYS.reply("*"))


def test_requests_queued_before_any_worker_are_served(make_stack, digits_model):
    stack = make_stack(
        workers=0,
        env=digits_env(digits_model, INFERSTACK_REQUEST_TIMEOUT_S="90", INFERSTACK_WEB_PROCESSES="1"),
        wait=False,
    )
    stack.wait_ready(timeout_s=60, workers=0)  # web and Redis up; no worker needed
    uploads = [png_bytes(img) for img in digits_model["x_test"][:6]]
    with ThreadPoolExecutor(6) as pool:
        # Generous timeouts: the worker's start (TensorFlow import, model load) is slow on a busy CPU.
        futures = [pool.submit(post, stack, u, timeout=120) for u in uploads]
        time.sleep(1.0)
        stack.start_worker()  # comes up with 6 requests already queued
        results = [f.result() for f in futures]
    assert [r.status_code for r in results] == [200] * 6
    r = redis.Redis.from_url(stack.env["INFERSTACK_REDIS_URL"])
    assert r.xlen("inferstack:requests") == 0
    assert not r.keys("inferstack:reply:*"), "replies are consumed, none left behind"


def test_sigterm_finishes_the_batch_then_exits(make_stack, photos):
    stack = make_stack(
        workers=2,
        env={"INFERSTACK_MODEL": "MobileNetV3Small", "INFERSTACK_WEIGHTS": "none", "INFERSTACK_BATCH_SIZE": "8"},
    )
    r = redis.Redis.from_url(stack.env["INFERSTACK_REDIS_URL"])
    victim = stack.workers[0]
    victim_name = f"local-worker-1-{os.getpid()}"
    stopped = threading.Event()
    t = signal_when_busy(r, victim, victim_name, signal.SIGTERM, stopped)
    uploads = [photos[name] for name in sorted(photos)] * 8
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda u: post(stack, u), uploads))
    t.join()
    assert stopped.is_set()
    assert victim.wait(30) == 0
    assert [resp.status_code for resp in responses] == [200] * len(uploads)
    # The victim answered what it held itself: nothing was left for the survivor to reclaim.
    assert "reclaimed" not in stack_log(stack)
    assert not r.zscore("inferstack:workers", victim_name), "a stopped worker leaves the live set at once"
