"""Served vs raw, measured side by side in one run on this machine.

1. Raw: the worker's own compiled model call, in process: throughput at the batch size and
   batch-1 latency.
2. Served: the local stack (redis-server + 1 worker + gunicorn) under a closed-loop HTTP load of
   1..64 concurrent clients posting a real JPEG; throughput and p50/p95/p99 per level.
3. Batch delay trade-off at 8 clients.

Prints a table and the ratios, writes JSON and a PNG plot under bench/results/.
Usage: python bench/bench.py [--model ResNet50] [--duration 15] [--quick]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inferstack.config import Settings  # noqa: E402
from tools.devstack import LocalStack  # noqa: E402
from inferstack.imaging import decode_image  # noqa: E402


def photo_jpeg() -> bytes:
    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"cat.jpg\"\r\n"
        f"Content-Type: image/jpeg\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def load_raw(model: str, weights: str, batch_size: int):
    """The worker's own classifier (same compiled call), in this process."""
    from inferstack_worker.model import load_classifier

    clf = load_classifier(Settings(model=model, weights=weights, batch_size=batch_size))
    clf.warm_up(batch_size)
    x = clf.prepare(decode_image(photo_jpeg(), clf.input_shape[:2]))
    return clf, x


def raw_latencies(clf, x: np.ndarray, seconds: float) -> list[float]:
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(lat) < 10:
        t0 = time.perf_counter()
        clf.predict(x[None])
        lat.append((time.perf_counter() - t0) * 1000)
    return lat


def raw_throughput(clf, x: np.ndarray, batch_size: int, seconds: float) -> float:
    batch = np.stack([x] * batch_size)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        clf.predict(batch)
        n += 1
    return n * batch_size / (time.perf_counter() - t0)


def load(url: str, clients: int, seconds: float, body: bytes, ctype: str) -> dict[str, float]:
    """Closed loop: each client posts, waits for the answer, posts again (keep-alive)."""
    host, port = url.split("//")[1].split(":")
    latencies: list[float] = []
    failures = 0
    codes: dict[int, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client() -> None:
        nonlocal failures
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        start.wait()
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict", body, {"Content-Type": ctype})
                resp = conn.getresponse()
                payload = resp.read()
                ok = resp.status == 200 and json.loads(payload).get("success") is True
                status = resp.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=120)
                ok, status = False, -1
            dt = time.perf_counter() - t0
            with lock:
                codes[status] = codes.get(status, 0) + 1
                if ok:
                    latencies.append(dt)
                else:
                    failures += 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {
        "latencies_ms": list(lat),
        "clients": clients,
        "requests": len(latencies),
        "failures": failures,
        "codes": {str(k): v for k, v in sorted(codes.items())},
        "throughput_img_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def show(res: dict) -> dict:
    print(f"  {res['clients']:3d} clients: {res['throughput_img_s']:6.1f} img/s  p50 {res['p50_ms']:7.1f} ms  "
          f"p95 {res['p95_ms']:7.1f} ms  p99 {res['p99_ms']:7.1f} ms  failures {res['failures']}", flush=True)
    res.pop("latencies_ms", None)
    return res


def served_run(env: dict[str, str], levels: list[int], seconds: float, body: bytes, ctype: str,
               raw: tuple | None = None) -> tuple[list[dict], list[float]]:
    """Sweep client counts on a fresh stack. With raw=(clf, x), 1-client latency is measured in
    rounds alternating with the raw batch-1 call, so machine drift hits both alike."""
    raw_lat: list[float] = []
    with LocalStack(env=env) as stack:
        stack.start(workers=1)
        load(stack.url, 2, 1.0, body, ctype)  # first requests pay one-off costs
        out = []
        for clients in levels:
            if clients == 1 and raw is not None:
                served_lat: list[float] = []
                requests_done = 0
                t_served = 0.0
                for _ in range(3):
                    raw_lat += raw_latencies(raw[0], raw[1], seconds / 3)
                    res = load(stack.url, 1, seconds / 3, body, ctype)
                    served_lat += res["latencies_ms"]
                    requests_done += res["requests"]
                    t_served += seconds / 3
                lat = np.array(served_lat)
                res.update(requests=requests_done, throughput_img_s=requests_done / t_served,
                           p50_ms=float(np.percentile(lat, 50)), p95_ms=float(np.percentile(lat, 95)),
                           p99_ms=float(np.percentile(lat, 99)))
            else:
                res = load(stack.url, clients, seconds, body, ctype)
            out.append(show(res))
    return out, raw_lat


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result["served"]
    clients = [r["clients"] for r in sweep]
    fig, ax1 = plt.subplots(figsize=(8, 4.5))
    ax1.plot(clients, [r["throughput_img_s"] for r in sweep], "o-", color="tab:blue", label="served throughput")
    ax1.axhline(result["raw"]["throughput_img_s"], color="tab:blue", ls="--",
                label=f"raw model throughput (batch {result['raw']['batch_size']})")
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(clients, [str(c) for c in clients])
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("images / s", color="tab:blue")
    ax1.set_ylim(bottom=0)
    ax2 = ax1.twinx()
    ax2.plot(clients, [r["p99_ms"] for r in sweep], "s-", color="tab:red", label="served p99 latency")
    ax2.set_ylabel("p99 latency (ms)", color="tab:red")
    ax2.set_yscale("log")
    lines = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax1.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax1.legend(lines, labels, loc="center right", fontsize=8)
    ax1.set_title(f"inferstack, {result['model']} on {result['machine']['cpus']} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("BENCH_MODEL", "ResNet50"))
    ap.add_argument("--weights", default="none", help="weights do not change speed; none needs no download")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--duration", type=float, default=float(os.environ.get("BENCH_DURATION", "15")))
    ap.add_argument("--clients", default="1,2,4,8,16,32,64")
    ap.add_argument("--delays", default="0,2,5,10,20", help="batch delays (ms) tried at 8 clients; '' skips")
    ap.add_argument("--quick", action="store_true", help="short smoke run: 3 s per point, fewer levels")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if args.quick:
        args.duration, args.clients, args.delays = 3.0, "1,8,32", "0,5"
    levels = [int(c) for c in args.clients.split(",")]
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    body, ctype = multipart(photo_jpeg())

    print(f"raw: {args.model} in process, the worker's compiled call", flush=True)
    clf, x = load_raw(args.model, args.weights, args.batch_size)
    tp_before = raw_throughput(clf, x, args.batch_size, args.duration)
    print(f"  batch {args.batch_size}: {tp_before:.1f} img/s", flush=True)

    env = {"INFERSTACK_MODEL": args.model, "INFERSTACK_WEIGHTS": args.weights,
           "INFERSTACK_BATCH_SIZE": str(args.batch_size)}
    print("served: local stack, 1 worker, gunicorn 2x32 threads (1 client alternates with raw batch 1)", flush=True)
    served, raw_lat = served_run(env, levels, args.duration, body, ctype, raw=(clf, x))
    tp_after = raw_throughput(clf, x, args.batch_size, args.duration)
    print(f"raw again: batch {args.batch_size}: {tp_after:.1f} img/s", flush=True)
    if not raw_lat:
        raw_lat = raw_latencies(clf, x, args.duration / 2)
    raw = {
        "batch_size": args.batch_size,
        # Before and after the sweep, averaged: the machine's speed drifts over minutes.
        "throughput_img_s": (tp_before + tp_after) / 2,
        "throughput_before_after_img_s": [tp_before, tp_after],
        "batch1_latency_ms": float(np.median(raw_lat)),
    }
    del clf

    delay_sweep = []
    if delays:
        print("batch delay trade-off at 8 clients", flush=True)
        for d in delays:
            print(f" delay {d:g} ms", flush=True)
            res = served_run({**env, "INFERSTACK_MAX_BATCH_DELAY_MS": str(d)}, [8], args.duration, body, ctype)[0]
            delay_sweep.append({"max_batch_delay_ms": d, **res[0]})

    by_clients = {r["clients"]: r for r in served}
    saturation = max(served, key=lambda r: r["throughput_img_s"])
    ratios = {
        "served_over_raw_at_saturation": saturation["throughput_img_s"] / raw["throughput_img_s"],
        "served_over_raw_by_clients": {str(r["clients"]): r["throughput_img_s"] / raw["throughput_img_s"]
                                       for r in served},
    }
    if 1 in by_clients:
        ratios["p50_1_client_minus_raw_batch1_ms"] = by_clients[1]["p50_ms"] - raw["batch1_latency_ms"]
    result = {
        "model": args.model,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "duration_s_per_point": args.duration,
        "raw": raw,
        "served": served,
        "delay_sweep_8_clients": delay_sweep,
        "ratios": ratios,
        "targets": {
            "served_over_raw_at_saturation": ">= 0.85",
            "served_over_raw_from_8_clients": ">= 0.85",
            "p50_1_client_minus_raw_batch1_ms": "<= 15",
            "failures_at_64_clients": "0",
        },
    }
    print("\nclients  img/s  served/raw   p50 ms   p95 ms   p99 ms  failures")
    for r in served:
        print(f"{r['clients']:7d} {r['throughput_img_s']:6.1f} {r['throughput_img_s'] / raw['throughput_img_s']:10.2f} "
              f"{r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['p99_ms']:8.1f} {r['failures']:9d}")
    print(f"raw: {raw['throughput_img_s']:.1f} img/s at batch {args.batch_size}, {raw['batch1_latency_ms']:.1f} ms at batch 1")
    print(f"served/raw at saturation: {ratios['served_over_raw_at_saturation']:.2f} (target >= 0.85)")
    if "p50_1_client_minus_raw_batch1_ms" in ratios:
        print(f"p50 at 1 client - raw batch-1 latency: {ratios['p50_1_client_minus_raw_batch1_ms']:+.1f} ms "
              "(target <= 15)")
    if delay_sweep:
        print("\ndelay ms  img/s   p50 ms   p99 ms  (8 clients)")
        for r in delay_sweep:
            print(f"{r['max_batch_delay_ms']:8g} {r['throughput_img_s']:6.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "latest"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{stem}.png")
    print(f"\nwrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
