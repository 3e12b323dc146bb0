"""The served API end to end: real redis-server, real worker processes, real gunicorn, real HTTP."""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image


from tests.helpers import DIGIT_LABELS, digits_env, jpeg_bytes, png_bytes, post

MAX_BYTES = 300_000
MAX_PIXELS = 4_000_000


@pytest.fixture(scope="module")
def stack(make_stack, digits_model):
    # Two workers and two gunicorn processes: results must still reach the right request.
    return make_stack(
        workers=2,
        env=digits_env(
            digits_model,
            INFERSTACK_MAX_IMAGE_BYTES=str(MAX_BYTES),
            INFERSTACK_MAX_IMAGE_PIXELS=str(MAX_PIXELS),
            INFERSTACK_BATCH_SIZE="16",
        ),
    )


def test_seed_compatible_request_and_response(stack, digits_model):
    r = post(stack, png_bytes(digits_model["x_test"][0]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True
    preds = body["predictions"]
    assert len(preds) == 5  # top 5 by default
    assert all(set(p) >= {"label", "probability"} for p in preds)
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True)
    assert {p["label"] for p in preds} <= set(DIGIT_LABELS)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k(stack, digits_model, k):
    r = post(stack, png_bytes(digits_model["x_test"][1]), top_k=k)
    assert r.status_code == 200
    assert len(r.json()["predictions"]) == k


def test_top_k_above_class_count_returns_all_classes(stack, digits_model):
    r = post(stack, png_bytes(digits_model["x_test"][1]), top_k=1000)
    preds = r.json()["predictions"]
    assert sorted(p["label"] for p in preds) == sorted(DIGIT_LABELS)
    assert abs(sum(p["probability"] for p in preds) - 1.0) < 1e-4


def test_served_result_equals_in_process_output(stack, digits_model, in_process):
    for i in range(10):
        upload = png_bytes(digits_model["x_test"][i])
        served = {p["label"]: p["probability"] for p in post(stack, upload, top_k=10).json()["predictions"]}
        direct = in_process(upload)
        # Label order: the i-th output of the model is the i-th line of the labels file.
        for idx, label in enumerate(DIGIT_LABELS):
            assert served[label] == pytest.approx(float(direct[idx]), abs=1e-4)


def test_accuracy_over_http_matches_in_process(stack, digits_model, in_process):
    x_test, y_test = digits_model["x_test"], digits_model["y_test"]
    uploads = [png_bytes(img) for img in x_test]
    direct = np.array([int(np.argmax(in_process(u))) for u in uploads])

    def served_class(upload: bytes) -> int:
        r = post(stack, upload, top_k=1)
        assert r.status_code == 200, r.text
        return DIGIT_LABELS.index(r.json()["predictions"][0]["label"])

    # 16 clients at once: batches form across requests, two workers and two web processes share them.
    with ThreadPoolExecutor(16) as pool:
        served = np.array(list(pool.map(served_class, uploads)))
    acc_direct = float(np.mean(direct == y_test))
    acc_served = float(np.mean(served == y_test))
    assert acc_direct > 0.85, "the test model should have learnt the digits"
    assert acc_served == acc_direct
    # Stronger: every single answer is the one for that image (nothing crossed between requests).
    assert np.array_equal(served, direct)


def test_real_photo_jpeg_is_accepted(stack, photos):
    r = post(stack, photos["chelsea.jpg"], name="cat.jpg")
    assert r.status_code == 200 and r.json()["success"] is True


def _text_file() -> bytes:
    return b"name,value\n" + b"row,1\n" * 100


def _truncated_jpeg() -> bytes:
    import skimage.data

    data = jpeg_bytes(skimage.data.coffee())
    return data[: len(data) // 3]


def _too_many_pixels() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (2500, 2000)).save(buf, format="PNG")
    return buf.getvalue()


def _tga() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buf, format="TGA")
    return buf.getvalue()


BAD_UPLOADS = {
    "text file": (lambda: {"files": {"image": ("notes.csv", _text_file())}}, 400, "not a supported image"),
    "truncated jpeg": (lambda: {"files": {"image": ("cut.jpg", _truncated_jpeg())}}, 400, "damaged|incomplete"),
    "zero-byte file": (lambda: {"files": {"image": ("empty.jpg", b"")}}, 400, "empty"),
    "unsupported format": (lambda: {"files": {"image": ("x.tga", _tga())}}, 400, "not a supported image"),
    "too many pixels": (lambda: {"files": {"image": ("huge.png", _too_many_pixels())}}, 400, "pixels"),
    "wrong field name": (lambda: {"files": {"file": ("cat.png", png_bytes(np.zeros((8, 8, 3), np.uint8)))}},
                         400, "No 'image' field"),
    "empty body": (lambda: {"data": b""}, 400, "No 'image' field"),
    "form without file": (lambda: {"data": {"image": "not-a-file"}}, 400, "No 'image' field"),
    "oversized upload": (lambda: {"files": {"image": ("big.bin", b"\xff" * (MAX_BYTES + 70_000))}}, 413,
                         "larger than the limit"),
    "oversized file inside limit slack": (lambda: {"files": {"image": ("big.bin", b"\xff" * (MAX_BYTES + 10))}},
                                          413, "larger than the limit"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_input_gets_json_error_and_service_stays_healthy(stack, digits_model, case):
    make_kwargs, status, words = BAD_UPLOADS[case]
    r = requests.post(stack.url + "/predict", timeout=60, **make_kwargs())
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert body["success"] is False
    assert re.search(words, body["error"]), body["error"]
    assert "Traceback" not in r.text
    ok = post(stack, png_bytes(digits_model["x_test"][2]))
    assert ok.status_code == 200 and ok.json()["success"] is True


@pytest.mark.parametrize("value", ["abc", "0", "1001", "-3", "2.5"])
def test_bad_top_k(stack, digits_model, value):
    r = post(stack, png_bytes(digits_model["x_test"][0]), top_k=value)
    assert r.status_code == 400
    assert "top_k" in r.json()["error"]


def test_unknown_route_and_method_are_json(stack):
    r = requests.get(stack.url + "/predict", timeout=10)
    assert r.status_code == 405 and r.json()["success"] is False
    r = requests.get(stack.url + "/nope", timeout=10)
    assert r.status_code == 404 and r.json()["success"] is False


def test_health_ready_metrics(stack, digits_model):
    assert requests.get(stack.url + "/healthz", timeout=10).status_code == 200
    ready = requests.get(stack.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["workers"] == 2
    post(stack, png_bytes(digits_model["x_test"][3]))
    text = requests.get(stack.url + "/metrics", timeout=10).text
    assert 'inferstack_requests_total{code="200"}' in text
    assert 'inferstack_requests_total{code="400"}' in text
    assert "inferstack_request_latency_seconds_bucket" in text
    assert "inferstack_queue_depth 0" in text
    assert "inferstack_live_workers 2" in text
