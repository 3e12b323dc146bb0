"""Hostile request bodies against a real gunicorn: bodies dripped after complete headers, an
`outputs` bomb, and many small gzip bodies that inflate to large images (memory outside the slots)."""

from __future__ import annotations

import base64
import gzip
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from inferstack.config import Settings, web_memory_limit_bytes
from inferstack.contract.http import PREDICT_PATH
from inferstack_web.cli import HEADER_TIMEOUT_S
from tests.helpers import Dripper, PeakRss, digits_env, encode, png_bytes, post, stack_log, tree_rss

BODY_TIMEOUT_S = 8  # the stack's INFERSTACK_BODY_TIMEOUT_S: long enough to probe while bodies drip
MODEL = "digits"
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def stack(make_stack, digits_model):
    # Fewer connections and a smaller decode budget than the defaults (still room for a 10 MB BMP):
    # a tighter memory promise for the gzip test to hold the web tier to.
    return make_stack(workers=1, env=digits_env(digits_model, INFERSTACK_WEB_PROCESSES="2",
                                                INFERSTACK_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
                                                INFERSTACK_WEB_CONNECTIONS="100",
                                                INFERSTACK_MAX_DECODE_BYTES=str(32 * 2**20)))


def v2_body(images: list[bytes], **extra: object) -> dict[str, object]:
    return {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                        "data": [base64.b64encode(i).decode() for i in images]}], **extra}


def open_dripping_bodies(stack, path: str, count: int) -> list[socket.socket]:
    """`count` requests with complete headers whose body has only begun (1 KB of 1 MB announced)."""
    if path == PREDICT_PATH:
        content_type = "multipart/form-data; boundary=b"
        start = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    else:
        content_type, start = "application/json", b'{"inputs": [{"name": "image", "data": ["'
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {1_000_000}\r\n\r\n").encode()
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", stack.port), timeout=BODY_TIMEOUT_S + 20)
        s.sendall(head + start + b"A" * 1000)
        socks.append(s)
    return socks


def read_answer(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket timeout fails the test)."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def normal_request(stack, path: str, image: bytes) -> requests.Response:
    if path == PREDICT_PATH:
        return post(stack, image, timeout=30)
    return requests.post(stack.url + path, json=v2_body([image]), timeout=30)


@pytest.mark.parametrize("path", [PREDICT_PATH, INFER])
def test_dripped_bodies_hold_no_decode_slot_and_are_answered_408(stack, digits_model, path):
    # 12 slow bodies against 2 processes x 2 decode slots: none may wait in a slot for its bytes.
    socks = open_dripping_bodies(stack, path, 12)
    try:
        with Dripper(socks, 2.0, b"A"):
            time.sleep(1)  # every slow request has reached its view
            t0 = time.monotonic()
            normal = normal_request(stack, path, png_bytes(digits_model["x_test"][0]))
            elapsed = time.monotonic() - t0
            print(f"{path} beside 12 dripped bodies: {normal.status_code} in {elapsed:.2f} s")
            assert normal.status_code == 200, normal.text + stack_log(stack)
            with ThreadPoolExecutor(len(socks)) as pool:  # the body deadline ends each of them
                answers = list(pool.map(read_answer, socks))
    finally:
        for s in socks:
            s.close()
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"application/json" in head and "error" in json.loads(body), answer[:300]
        assert b"Connection: close" in head, answer[:300]


def test_outputs_bomb_is_400_at_once_without_building_outputs(stack, digits_model):
    body = v2_body([png_bytes(digits_model["x_test"][0])], outputs=[{"name": "probabilities"}] * 100_000)
    idle = tree_rss(stack.web.pid)
    with PeakRss(stack.web.pid) as rss:
        t0 = time.monotonic()
        r = requests.post(stack.url + INFER, json=body, timeout=120)
        elapsed = time.monotonic() - t0
    growth = rss.peak - idle
    print(f"100,000 outputs: {r.status_code} in {elapsed:.2f} s, web tree {idle / 2**20:.0f} -> "
          f"{rss.peak / 2**20:.0f} MiB")
    assert r.status_code == 400 and list(r.json()) == ["error"], r.text[:300]
    assert growth < 100 * 2**20, f"the web tree grew by {growth / 2**20:.0f} MiB"
    assert normal_request(stack, INFER, png_bytes(digits_model["x_test"][0])).status_code == 200


def big_bmp() -> bytes:
    """A ~10 MB BMP (under the default 10 MiB upload limit) that gzips to a few KB."""
    return encode(Image.new("RGB", (1820, 1820), (40, 90, 160)), "BMP")


@pytest.mark.parametrize("path", [PREDICT_PATH, INFER])
def test_many_small_gzip_bodies_of_large_images_stay_under_the_memory_limit(stack, path):
    bmp = big_bmp()
    assert 9_000_000 < len(bmp) <= Settings().max_image_bytes
    if path == PREDICT_PATH:
        raw = json.dumps({"image": base64.b64encode(bmp).decode()}).encode()
    else:
        raw = json.dumps(v2_body([bmp])).encode()
    body = gzip.compress(raw)
    assert len(body) < 100_000
    limit = web_memory_limit_bytes(Settings.from_env(stack.env))
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}

    def send(_: int) -> requests.Response:
        return requests.post(stack.url + path, data=body, headers=headers, timeout=120)

    with PeakRss(stack.web.pid) as rss, ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(send, range(48)))
    codes = sorted(r.status_code for r in answers)
    print(f"{path}: 48 gzip bodies of {len(body)} B ({len(raw) / 2**20:.1f} MiB inflated): statuses "
          f"{ {c: codes.count(c) for c in set(codes)} }, peak web RSS {rss.peak / 2**20:.0f} MiB "
          f"(limit {limit / 2**20:.0f} MiB)")
    assert rss.peak < limit, f"peak {rss.peak / 2**20:.0f} MiB over the {limit / 2**20:.0f} MiB limit"
    assert all(r.headers["Content-Type"] == "application/json" for r in answers)
    # On this shared CPU a few may find every decode slot busy for its whole wait: 503, retry later.
    busy = [r for r in answers if r.status_code == 503 and "Retry-After" in r.headers]
    assert codes.count(200) + len(busy) == 48, [r.text[:200] for r in answers if r.status_code != 200][:3]
    assert codes.count(200) >= 24, codes


def test_gzipped_shape_bombs_are_400_at_once(stack):
    # The bodies: hundreds of 4,299-digit dimensions (math.prod would block the process for
    # seconds) and one 4,400-digit integer (json.loads raises ValueError), gzipped to a few KB.
    for dims, digits in ((300, 4299), (1, 4400)):
        raw = json.dumps(v2_body([b"x"])).replace('"shape": [1]', f'"shape": [{", ".join(["9" * digits] * dims)}]')
        body = gzip.compress(raw.encode())
        t0 = time.monotonic()
        r = requests.post(stack.url + INFER, data=body, timeout=60,
                          headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        print(f"shape of {dims} {digits}-digit dimensions ({len(body)} B gzipped): {r.status_code} "
              f"in {time.monotonic() - t0:.2f} s")
        assert r.status_code == 400 and f"{digits} digits" in r.json()["error"], r.text[:300]


def test_dripped_headers_are_cut_off_at_the_header_deadline(stack):
    with socket.create_connection(("127.0.0.1", stack.port), timeout=HEADER_TIMEOUT_S + 20) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        with Dripper([s], 1.0, b"X"):
            try:
                answer = read_answer(s)
            except ConnectionResetError:
                answer = b""
        elapsed = time.monotonic() - t0
    print(f"dripped headers: connection closed after {elapsed:.1f} s")
    assert not answer.startswith(b"HTTP/1.1 2"), answer[:200]


def test_bodies_beyond_the_spool_budget_are_503_and_give_back_their_share():
    # In process (no server needed): the budget is charged as bytes arrive and given back on release.
    from flask import Flask

    from inferstack_web.errors import Unavailable
    from inferstack_web.uploads import SpoolBudget, SpoolingRequest, receive_body

    app = Flask("spool")
    app.request_class = SpoolingRequest
    budget = SpoolBudget(300_000)
    with app.test_request_context(PREDICT_PATH, method="POST", data=b"x" * 200_000):
        first = receive_body(1_000_000, 5.0, budget)
        with app.test_request_context(PREDICT_PATH, method="POST", data=b"y" * 200_000):
            with pytest.raises(Unavailable):
                receive_body(1_000_000, 5.0, budget)
        assert budget.left == 100_000  # the refused body gave back what it had taken
        assert first.data() == b"x" * 200_000
        first.release()
    assert budget.left == 300_000
