"""Load test for /predict: real photos, mixed sizes and formats, posted as the seed's clients do.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:5000 --headless -u 16 -r 4 -t 60s \
        --max-fail-ratio 0 --max-p95-ms 3000

A headless run exits non-zero when the failure ratio or the p95 latency exceeds its threshold,
so the same file gates CI smoke runs and long soaks. Photos come from scikit-image's samples,
or from the folder in LOCUST_IMAGES_DIR.
"""

from __future__ import annotations

import io
import logging
import os
import random
from pathlib import Path

from locust import HttpUser, constant, events, task
from locust.env import Environment

log = logging.getLogger("inferstack.loadtest")

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                 ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}


def _encode(arr, fmt: str, size: tuple[int, int] | None = None, mode: str | None = None) -> bytes:
    from PIL import Image

    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    if size:
        im = im.resize(size)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def load_images() -> list[tuple[str, bytes, str]]:
    folder = os.environ.get("LOCUST_IMAGES_DIR")
    if folder:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in CONTENT_TYPES)
        if not files:
            raise SystemExit(f"LOCUST_IMAGES_DIR={folder} holds no images")
        return [(p.name, p.read_bytes(), CONTENT_TYPES[p.suffix.lower()]) for p in files]
    import skimage.data

    return [
        ("chelsea.jpg", _encode(skimage.data.chelsea(), "JPEG"), "image/jpeg"),  # 451x300 cat
        ("coffee.png", _encode(skimage.data.coffee(), "PNG"), "image/png"),  # 600x400
        ("astronaut.webp", _encode(skimage.data.astronaut(), "WEBP"), "image/webp"),  # 512x512
        ("rocket-large.jpg", _encode(skimage.data.rocket(), "JPEG", size=(1920, 1280)), "image/jpeg"),
        ("camera-gray.png", _encode(skimage.data.camera(), "PNG"), "image/png"),  # grayscale
        ("chelsea-small.gif", _encode(skimage.data.chelsea(), "GIF", size=(160, 106), mode="P"), "image/gif"),
    ]


IMAGES = load_images()


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--max-fail-ratio", type=float, default=0.0, env_var="LOCUST_MAX_FAIL_RATIO",
                        help="headless exit code 1 above this failure ratio (0..1)")
    parser.add_argument("--max-p95-ms", type=float, default=5000.0, env_var="LOCUST_MAX_P95_MS",
                        help="headless exit code 1 above this p95 latency (ms)")
    parser.add_argument("--top-k", type=int, default=5, env_var="LOCUST_TOP_K", help="top_k asked for")


class PredictUser(HttpUser):
    # Closed loop: each user posts again as soon as it has its answer.
    wait_time = constant(float(os.environ.get("LOCUST_WAIT_S", "0")))

    @task
    def predict(self) -> None:
        name, data, ctype = random.choice(IMAGES)
        top_k = self.environment.parsed_options.top_k if self.environment.parsed_options else 5
        with self.client.post(
            "/predict", files={"image": (name, data, ctype)}, params={"top_k": top_k},
            name="/predict", catch_response=True, timeout=120,
        ) as resp:
            if resp.status_code != 200:
                try:
                    detail = resp.json().get("error", "")
                except ValueError:
                    detail = (resp.text or "")[:80]
                resp.failure(f"HTTP {resp.status_code}: {detail}")
                return
            try:
                body = resp.json()
            except ValueError:
                resp.failure("response is not JSON")
                return
            preds = body.get("predictions")
            if body.get("success") is not True or not isinstance(preds, list):
                resp.failure(f"success is not true: {str(body)[:120]}")
            elif len(preds) != top_k:
                resp.failure(f"expected {top_k} predictions, got {len(preds)}")
            elif any(not isinstance(p.get("label"), str) or not 0.0 <= p.get("probability", -1) <= 1.0 for p in preds):
                resp.failure("a prediction lacks a label or a probability in [0, 1]")
            elif [p["probability"] for p in preds] != sorted((p["probability"] for p in preds), reverse=True):
                resp.failure("predictions are not sorted by probability")
            else:
                resp.success()


@events.quitting.add_listener
def _gate(environment: Environment, **_kw) -> None:
    opts = environment.parsed_options
    if opts is None:
        return
    total = environment.stats.total
    p95 = total.get_response_time_percentile(0.95) or 0.0
    if total.num_requests == 0:
        log.error("no request completed")
        environment.process_exit_code = 1
    elif total.fail_ratio > opts.max_fail_ratio:
        log.error("failure ratio %.4f > %.4f", total.fail_ratio, opts.max_fail_ratio)
        environment.process_exit_code = 1
    elif p95 > opts.max_p95_ms:
        log.error("p95 %.0f ms > %.0f ms", p95, opts.max_p95_ms)
        environment.process_exit_code = 1
    else:
        log.info("passed: %d requests, failure ratio %.4f, p95 %.0f ms", total.num_requests, total.fail_ratio, p95)
        environment.process_exit_code = 0
