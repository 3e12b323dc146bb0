"""Scale from zero, locally: how long a request queued with no worker waits once a worker starts.

The stack runs with zero workers (what KEDA leaves when idle); one photo is queued; then a
worker process starts (what KEDA's activation does, minus scheduling and image pull) and we
time worker start -> answer, which is model load + warm-up + the first batch. ResNet50 by
default; without cached ImageNet weights it runs with random ones (same speed).

    .venv/bin/python bench/scale_from_zero.py [--runs 3] [--model ResNet50]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import redis
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inferstack.contract.http import IMAGE_FIELD, PREDICT_PATH, READYZ_PATH  # noqa: E402
from inferstack.contract.queue import GROUP, Keys  # noqa: E402
from inferstack.contract.settings import env_name as E  # noqa: E402
from tools.devstack import LocalStack, weights_fallback_env  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "scale_from_zero.json"


def photo() -> bytes:
    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def lag(r: redis.Redis, stream: str) -> int:
    return next(int(g["lag"] or 0) for g in r.xinfo_groups(stream) if g["name"].decode() == GROUP)


def one_run(stack: LocalStack, upload: bytes, index: int) -> dict[str, float]:
    r = redis.Redis.from_url(stack.env[E("redis_url")])
    stream = Keys("inferstack").stream
    result: dict[str, requests.Response] = {}
    client = threading.Thread(target=lambda: result.update(rsp=requests.post(
        stack.url + PREDICT_PATH, files={IMAGE_FIELD: ("chelsea.jpg", upload)}, timeout=600)))
    client.start()
    while lag(r, stream) < 1:
        time.sleep(0.01)
    started = time.monotonic()
    worker = stack.start_worker()
    client.join()
    elapsed = time.monotonic() - started
    if result["rsp"].status_code != 200:
        raise RuntimeError(f"run {index}: {result['rsp'].status_code} {result['rsp'].text}")
    log = (stack.log_dir / f"worker-{stack._worker_seq}.log").read_text(errors="replace")
    worker.send_signal(signal.SIGTERM)
    worker.wait(60)
    stack.workers.remove(worker)
    load = re.search(r"loaded in ([0-9.]+) s", log)
    warm = re.search(r"warm-up done in ([0-9.]+) s", log)
    runtime = re.search(r"runtime (\S+), precision (\S+)", log)
    return {"worker_start_to_answer_s": round(elapsed, 2),
            "runtime": " ".join(runtime.groups()).rstrip(",") if runtime else None,
            "model_load_s": float(load.group(1)) if load else None,
            "warm_up_s": float(warm.group(1)) if warm else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default=os.environ.get(E("model"), "ResNet50"))
    parser.add_argument("--batch-size", default=os.environ.get(E("batch_size"), "32"))
    args = parser.parse_args()
    env = {E("model"): args.model, E("batch_size"): args.batch_size,
           E("request_timeout_s"): "600", E("web_processes"): "1", **weights_fallback_env("bench")}
    stack = LocalStack(env=env)
    upload = photo()
    runs = []
    try:
        stack.start(workers=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(stack.url + READYZ_PATH, timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"web not ready; logs in {stack.log_dir}")
            time.sleep(0.1)
        for i in range(args.runs):
            runs.append(one_run(stack, upload, i))
            print(json.dumps(runs[-1]), file=sys.stderr)
    finally:
        stack.stop()
    times = [run["worker_start_to_answer_s"] for run in runs]
    report = {
        "what": "worker process start -> first answer to a request queued while no worker ran",
        "model": args.model, "weights": env.get(E("weights"), "imagenet"), "batch_size": int(args.batch_size),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "runs": runs,
        "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
