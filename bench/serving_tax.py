"""The serving tax in figures, measured side by side in one run on this machine.

1. Worker efficiency: requests are queued in Redis *before* the worker starts (no HTTP, no web
   tier), then one worker drains them; its steady rate over the raw rate of the same compiled call
   in this process (goal >= 0.95). The first batch, which pays the worker's start, is left out.
2. Web CPU per image, per format and size: the CPU seconds the gunicorn process tree spends per
   answered `/predict` (decode + HTTP + enqueue + reply wait), from /proc, under a closed loop of
   `--clients`; beside it the decode alone, in this process, so the rest is the HTTP and queue
   share (for PNGs also the same decode with Pillow alone, libspng's gain). Size web pods from the
   first figure and workers from the raw rate.
3. One client, where the latency goes: sequential `/predict` of the 451x300 JPEG, alternating with
   the raw batch-1 call in this process; the worker's own model time per request (its
   `inferstack_inference_seconds` metric), the CPU each process (web, Redis, worker) spends
   per request, and the request's timeline stage by stage: the stack runs with
   bench/tracehook on its PYTHONPATH, which timestamps the web's and the worker's steps on the
   clock every process shares (a few microseconds a request), so each millisecond over the raw
   call is put where it was spent.

Usage: python bench/serving_tax.py [--model ResNet50] [--precision auto] [--requests 256]
Writes bench/results/serving_tax.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench import load, load_raw, machine, multipart, raw_throughput, write_result  # noqa: E402

from inferstack.config import Settings  # noqa: E402
from inferstack.contract.http import METRICS_PATH, PREDICT_PATH  # noqa: E402
from inferstack.contract.settings import env_name as E  # noqa: E402
from inferstack.imaging import decode_image  # noqa: E402
from inferstack.protocol import WebQueue  # noqa: E402
from tools.devstack import LocalStack, free_port  # noqa: E402


def sample_images() -> dict[str, tuple[bytes, str]]:
    """Real photographs in the formats and sizes users send: name -> (file bytes, MIME type)."""
    import skimage.data
    from PIL import Image

    def save(im: Image.Image, fmt: str, **options: object) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **options)
        return buf.getvalue()

    cat = Image.fromarray(skimage.data.chelsea())
    astronaut = Image.fromarray(skimage.data.astronaut())
    coffee = Image.fromarray(skimage.data.coffee())
    return {
        "jpeg 451x300": (save(cat, "JPEG", quality=90), "image/jpeg"),
        "jpeg 4000x3000": (save(cat.resize((4000, 3000), Image.Resampling.BICUBIC), "JPEG", quality=90),
                           "image/jpeg"),
        "png 512x512": (save(astronaut, "PNG"), "image/png"),
        "webp 600x400": (save(coffee, "WEBP", quality=90), "image/webp"),
    }


def decode_ms(data: bytes, size: tuple[int, int], seconds: float, fast_png: bool = True) -> float:
    """Median CPU time of the web tier's decode of one file, in this thread (CPU, not wall, time:
    comparable with the web tree's CPU figure, and blind to other processes on a busy machine).
    fast_png=False: Pillow decodes PNGs too (the reference libspng's pixels are tested against)."""
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.thread_time()
        decode_image(data, size, fast_png=fast_png)
        times.append((time.thread_time() - t0) * 1000)
    return float(np.median(times))


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children (gunicorn's master and workers)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def worker_efficiency(env: dict[str, str], pixels: np.ndarray, count: int, batch_size: int) -> dict[str, float]:
    """One worker drains `count` pre-queued requests; its rate after the first batch."""
    prefix = Settings.from_env(env).queue_prefix
    with LocalStack(env=env) as stack:
        stack.start_redis()
        queue = WebQueue(stack.env[E("redis_url")], prefix, max_queue=count + 1, timeout_s=900.0)
        queue.ensure_group()
        ids = [queue.submit(pixels, top_k=5) for _ in range(count)]
        stack.start_worker()
        done = []
        for request_id in ids:
            reply = queue.wait(request_id)
            if reply.get("error"):
                raise RuntimeError(f"the worker answered an error: {reply}")
            done.append(time.perf_counter())
    first = min(batch_size, count - 1) - 1  # the end of the first batch, which paid the start
    rate = (count - 1 - first) / (done[-1] - done[first])
    return {"requests": count, "rate_img_s": rate}


def web_cpu(env: dict[str, str], images: dict[str, tuple[bytes, str]], clients: int,
            seconds: float) -> dict[str, dict[str, float]]:
    """CPU ms the web process tree spends per answered request, per image kind."""
    out = {}
    with LocalStack(env=env) as stack:
        stack.start(workers=1)
        for name, (data, mime) in images.items():
            body, ctype = multipart(data, mime)
            load(stack.url, clients, 1.0, body, ctype)  # warm: connections, first decodes
            before = tree_cpu_s(stack.web.pid)
            res = load(stack.url, clients, seconds, body, ctype)
            spent = tree_cpu_s(stack.web.pid) - before
            out[name] = {"requests": res["requests"], "failures": res["failures"],
                         "web_cpu_ms_per_image": 1000 * spent / max(res["requests"], 1),
                         "served_img_s": res["throughput_img_s"]}
            print(f"  {name:15s} web CPU {out[name]['web_cpu_ms_per_image']:6.2f} ms/image "
                  f"({res['requests']} answered, {res['failures']} failed)", flush=True)
    return out


def scrape(url: str, name: str) -> float:
    """The sum of a Prometheus metric's samples (all label sets) at url."""
    import urllib.request

    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# One request's stages at one client: (name, from mark, to mark), marks as bench/tracehook writes
# them ("client" is this process). Their sum is the client's latency.
STAGES = [
    ("client -> web handler (HTTP, gunicorn, Flask)", "client.B", "PredictEndpoints.predict.B"),
    ("body read", "PredictEndpoints.predict.B", "Inference.receive.E"),
    ("multipart split", "Inference.receive.E", "Inference.decode.B"),
    ("decode", "Inference.decode.B", "Inference.decode.E"),
    ("enqueue (Redis function)", "Inference.decode.E", "Inference._submit.E"),
    ("queue -> worker", "Inference._submit.E", "Worker.process.B"),
    ("worker before the model (clock, prepare)", "Worker.process.B", "Classifier.predict.B"),
    ("model", "Classifier.predict.B", "Classifier.predict.E"),
    ("worker after the model (top-k, reply)", "Classifier.predict.E", "WorkerQueue.complete.B"),
    ("reply write -> web wakes", "WorkerQueue.complete.B", "WebQueue._wait_raw.E"),
    ("web reply -> client (JSON, HTTP)", "WebQueue._wait_raw.E", "client.E"),
]
TRACEHOOK = ROOT / "bench" / "tracehook"
sys.path.insert(0, str(TRACEHOOK))

from stagetrace import TRACE_DIR_ENV, read_marks  # noqa: E402


def timeline(trace_dir: Path, windows: list[tuple[int, int]]) -> dict[str, float]:
    """Median ms of each stage over the client's request windows (ns), from the trace files."""
    marks = read_marks(str(trace_dir))
    per_stage: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    for begin, end in windows:
        seen = {"client.B": begin, "client.E": end}
        for t, mark in marks:
            if begin <= t <= end:
                seen.setdefault(mark, t)  # the first of each: this request's
        if all(a in seen and b in seen for _, a, b in STAGES):
            for name, a, b in STAGES:
                per_stage[name].append((seen[b] - seen[a]) / 1e6)
    return {name: float(np.median(v)) for name, v in per_stage.items() if v}


def one_client(env: dict[str, str], jpeg: bytes, clf: object, x: np.ndarray, rounds: int,
               per_round: int) -> dict[str, object]:
    """Sequential requests on one keep-alive connection, alternating with raw batch-1 calls."""
    import http.client
    import tempfile

    body, ctype = multipart(jpeg)
    port = free_port()
    worker_metrics = f"http://127.0.0.1:{port}{METRICS_PATH}"
    served, raw, model_s, cpu = [], [], 0.0, {"web": 0.0, "redis": 0.0, "worker": 0.0}
    windows: list[tuple[int, int]] = []
    trace_dir = Path(tempfile.mkdtemp(prefix="inferstack-trace-"))
    pythonpath = os.pathsep.join(p for p in (str(TRACEHOOK), os.environ.get("PYTHONPATH", "")) if p)
    env = {**env, "PYTHONPATH": pythonpath, TRACE_DIR_ENV: str(trace_dir)}
    with LocalStack(env=env) as stack:
        stack.start_redis()
        stack.start_worker(env={E("metrics_port"): str(port)})  # the worker's only: the web would bind it too
        stack.start_web()
        stack.wait_ready()
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)

        def post() -> float:
            t0 = time.perf_counter_ns()
            conn.request("POST", PREDICT_PATH, body, {"Content-Type": ctype})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"/predict answered {resp.status}")
            windows.append((t0, time.perf_counter_ns()))
            return (windows[-1][1] - t0) / 1e6

        for _ in range(5):
            post()  # warm: the connection, the first decodes, the worker's batch-1 path
        windows.clear()
        pids = {"web": stack.web.pid, "redis": stack.redis.pid, "worker": stack.workers[0].pid}
        for _ in range(rounds):
            before = {k: tree_cpu_s(p) for k, p in pids.items()}
            model_before = scrape(worker_metrics, "inferstack_inference_seconds_sum")
            served += [post() for _ in range(per_round)]
            model_s += scrape(worker_metrics, "inferstack_inference_seconds_sum") - model_before
            for k, p in pids.items():
                cpu[k] += tree_cpu_s(p) - before[k]
            for _ in range(per_round):
                t0 = time.perf_counter()
                clf.predict(x[None])  # type: ignore[attr-defined]
                raw.append((time.perf_counter() - t0) * 1000)
    n = len(served)
    stages = timeline(trace_dir, windows)
    shutil.rmtree(trace_dir, ignore_errors=True)
    return {"requests": n, "served_p50_ms": float(np.median(served)), "raw_batch1_p50_ms": float(np.median(raw)),
            "worker_model_ms_per_request": 1000 * model_s / n,
            "cpu_ms_per_request": {k: 1000 * v / n for k, v in cpu.items()},
            "stages_p50_ms": stages}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("BENCH_MODEL", "ResNet50"))
    ap.add_argument("--weights", default="none", help="weights do not change speed; none needs no download")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256, help="pre-queued requests the worker drains")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per timed point")
    ap.add_argument("--rounds", type=int, default=4, help="one-client rounds (25 requests, then 25 raw calls)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    env = {E("model"): args.model, E("weights"): args.weights, E("batch_size"): str(args.batch_size),
           E("precision"): args.precision}
    images = sample_images()
    clf, x = load_raw(args.model, args.weights, args.batch_size, precision=args.precision)
    size = clf.input_shape[:2]
    pixels = decode_image(images["jpeg 451x300"][0], size)
    raw_before = raw_throughput(clf, x, args.batch_size, args.duration)
    print(f"raw: {raw_before:.1f} img/s at batch {args.batch_size}", flush=True)
    decode = {name: decode_ms(data, size, 2.0) for name, (data, _) in images.items()}
    pillow_png = {name: decode_ms(data, size, 2.0, fast_png=False)
                  for name, (data, ctype) in images.items() if ctype == "image/png"}
    del clf  # the worker gets the cores to itself

    print(f"worker draining {args.requests} pre-queued requests", flush=True)
    drain = worker_efficiency(env, pixels, args.requests, args.batch_size)
    clf, x = load_raw(args.model, args.weights, args.batch_size, precision=args.precision)
    raw_after = raw_throughput(clf, x, args.batch_size, args.duration)
    del clf
    raw = (raw_before + raw_after) / 2
    efficiency = drain["rate_img_s"] / raw
    print(f"  worker {drain['rate_img_s']:.1f} img/s, raw {raw:.1f} (before/after {raw_before:.1f}/{raw_after:.1f}):"
          f" efficiency {efficiency:.3f} (goal >= 0.95)", flush=True)

    print(f"web CPU per image at {args.clients} clients", flush=True)
    web = web_cpu(env, images, args.clients, args.duration)
    for name, row in web.items():
        row["decode_ms"] = decode[name]
        row["http_and_queue_ms"] = row["web_cpu_ms_per_image"] - decode[name]
        if name in pillow_png:
            row["decode_pillow_only_ms"] = pillow_png[name]

    print("one client: served vs raw batch-1, alternating", flush=True)
    clf, x = load_raw(args.model, args.weights, args.batch_size, precision=args.precision)
    single = one_client(env, images["jpeg 451x300"][0], clf, x, args.rounds, 25)
    del clf
    single["served_minus_raw_ms"] = single["served_p50_ms"] - single["raw_batch1_p50_ms"]
    single["goal"] = "served p50 <= raw batch-1 + 5 ms"
    print(f"  served p50 {single['served_p50_ms']:.1f} ms, raw batch-1 p50 {single['raw_batch1_p50_ms']:.1f} ms "
          f"({single['served_minus_raw_ms']:+.1f}); the worker's model time {single['worker_model_ms_per_request']:.1f}"
          f" ms/request; CPU ms/request {json.dumps({k: round(v, 1) for k, v in single['cpu_ms_per_request'].items()})}",
          flush=True)
    for name, ms in single["stages_p50_ms"].items():
        print(f"    {ms:7.2f} ms  {name}")

    print("\nimage            web CPU ms/img  decode ms  rest ms   (CPU time; decode: in this process)")
    for name, row in web.items():
        print(f"{name:16s} {row['web_cpu_ms_per_image']:14.2f} {row['decode_ms']:10.2f} {row['http_and_queue_ms']:8.2f}")
    for name, ms in pillow_png.items():
        print(f"{name}: decode {decode[name]:.2f} ms (libspng) vs {ms:.2f} ms with Pillow alone: "
              f"{ms / decode[name]:.2f}x")
    result = {
        "model": args.model, "precision": args.precision, "batch_size": args.batch_size,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "raw_img_s": raw, "raw_before_after_img_s": [raw_before, raw_after],
        "worker": {**drain, "efficiency": efficiency, "goal": ">= 0.95"},
        "web_cpu_per_image": web,
        "one_client": single,
    }
    write_result(args.out, "serving_tax.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
