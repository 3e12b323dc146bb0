"""Hostile uploads and clients against a real gunicorn: decompression bombs, dripped bodies, slowloris."""

from __future__ import annotations

import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from inferstack.config import Settings, web_memory_limit_bytes
from tests.helpers import Dripper, PeakRss, digits_env, png_bytes, post, stack_log


def png_bomb(mode: str, side: int = 7070) -> bytes:
    """~100 KB on the wire, hundreds of MB once decoded."""
    buf = io.BytesIO()
    Image.new(mode, (side, side), 1000 if mode == "I;16" else (10, 20, 30, 255)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(make_stack, digits_model):
    return make_stack(workers=1, env=digits_env(digits_model, INFERSTACK_WEB_PROCESSES="2"))


def test_decompression_bombs_keep_the_web_tier_under_its_memory_limit(stack, digits_model):
    settings = Settings.from_env(stack.env)
    limit = web_memory_limit_bytes(settings)
    bombs = [png_bomb("I;16")] * 6 + [png_bomb("RGBA")] * 6  # 16-bit grey: 95 MiB; RGBA: 190 MiB decoded
    assert all(len(b) < 1_000_000 for b in bombs)
    with PeakRss(stack.web.pid) as rss, ThreadPoolExecutor(len(bombs)) as pool:
        answers = list(pool.map(lambda b: post(stack, b, timeout=120), bombs))
    peak = rss.peak
    print(f"peak web RSS under {len(bombs)} concurrent bombs: {peak / 2**20:.0f} MiB (limit {limit / 2**20:.0f} MiB)")
    assert peak < limit, f"peak {peak / 2**20:.0f} MiB over the {limit / 2**20:.0f} MiB limit"
    for resp, bomb in zip(answers, bombs):
        assert resp.headers["Content-Type"] == "application/json", resp.text[:200]
        assert resp.status_code in (200, 400, 503), resp.text
    over_budget = [resp for resp, bomb in zip(answers, bombs) if bomb is bombs[-1]]
    assert all(r.status_code == 400 and "MiB" in r.json()["error"] for r in over_budget)
    # Healthy afterwards: the same processes serve a normal request.
    assert post(stack, png_bytes(digits_model["x_test"][0])).status_code == 200
    assert stack.web.poll() is None


def test_dripped_oversized_body_is_answered_413_in_bounded_time(stack):
    # Declares 20 MB (over the limit), sends a little, then drips: the 413 must not wait for it.
    with socket.create_connection(("127.0.0.1", stack.port), timeout=30) as s:
        boundary = "xyz"
        head = (
            f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {20_000_000}\r\n\r\n"
        ).encode()
        s.sendall(head + f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\"\r\n\r\n".encode())
        s.sendall(b"\0" * 100_000)
        t0 = time.monotonic()
        with Dripper([s], 0.5, b"\0"):
            reply = s.recv(4096)
        elapsed = time.monotonic() - t0
    print(f"413 for a dripped 20 MB body after {elapsed:.1f} s")
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert elapsed < 15, f"413 took {elapsed:.1f} s"


def slow_client_probe(stack, connections: int = 80, interval_s: float = 2.0) -> tuple[float, int, int]:
    """Open `connections` sockets that drip a request header byte every interval_s, then time a
    normal /predict and /healthz. Returns (seconds, predict status, healthz status)."""
    socks: list[socket.socket] = []
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", stack.port), timeout=10)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    try:
        with Dripper(socks, interval_s, b"X"):
            time.sleep(2 * interval_s)  # every slow connection has been accepted and is being read
            t0 = time.monotonic()
            try:
                health = requests.get(stack.url + "/healthz", timeout=10).status_code
                predict = post(stack, png_bytes(np.zeros((32, 32, 3), np.uint8)), timeout=10).status_code
            except requests.RequestException:
                health = predict = 0
            return time.monotonic() - t0, predict, health
    finally:
        for s in socks:
            s.close()


def test_slow_clients_do_not_starve_real_users(stack):
    elapsed, predict, health = slow_client_probe(stack)
    print(f"80 slow connections: /healthz {health}, /predict {predict} in {elapsed:.2f} s")
    assert (health, predict) == (200, 200), stack_log(stack)
    assert elapsed < 10
