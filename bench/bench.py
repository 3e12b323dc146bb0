"""Served vs raw, measured side by side in one run on this machine.

1. Raw: the worker's own compiled model call, in process: throughput at the batch size and
   batch-1 latency.
2. Served: the local stack (redis-server + 1 worker + gunicorn) under a closed-loop HTTP load of
   1..64 concurrent clients posting a real JPEG; throughput and p50/p95/p99 per level.
3. Batch delay trade-off at 8 clients.

Prints a table and the ratios, writes JSON and a PNG plot under bench/results/.
Usage: python bench/bench.py [--model ResNet50] [--duration 15] [--quick]

With --runtime/--precision (e.g. --runtime keras,openvino --precision fp32,bf16,int8) it compares
runtimes instead: every combination raw and served at 1 and 16 clients, in alternating rounds, and
writes bench/results/runtimes.json.
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
from inferstack.contract.http import IMAGE_FIELD, PREDICT_PATH  # noqa: E402
from inferstack.contract.settings import env_name as E  # noqa: E402
from tools.devstack import LocalStack  # noqa: E402
from inferstack.imaging import decode_image  # noqa: E402


def photo_jpeg() -> bytes:
    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def multipart(data: bytes, mime: str = "image/jpeg") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{IMAGE_FIELD}\"; filename=\"upload\"\r\n"
        f"Content-Type: {mime}\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def load_raw(model: str, weights: str, batch_size: int, **runtime: str | None):
    """The worker's own classifier (same compiled call), in this process."""
    from inferstack_worker.model import load_classifier

    clf = load_classifier(Settings(model=model, weights=weights, batch_size=batch_size, **runtime))
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
                conn.request("POST", PREDICT_PATH, body, {"Content-Type": ctype})
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


def calibration_folder(path: Path) -> str:
    """Photos shipped with scikit-image, with crops and mirror images: int8 calibration for the bench."""
    import skimage.data
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "chelsea", "coffee", "rocket", "cat", "camera", "text", "moon", "coins",
                 "clock", "horse", "page", "brick", "grass", "gravel", "colorwheel", "logo"):
        try:
            im = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
        except Exception:  # some need a download; this machine may not have them
            continue
        w, h = im.size
        for i, box in enumerate([(0, 0, w, h), (0, 0, w * 2 // 3, h * 2 // 3), (w // 3, h // 3, w, h)]):
            crop = im.crop(box)
            crop.save(path / f"{name}-{i}.jpg", quality=90)
            crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path / f"{name}-{i}-mirror.jpg", quality=90)
    return str(path)


def compare_runtimes(args: argparse.Namespace) -> int:
    """Raw and served figures per runtime/precision, measured in alternating rounds."""
    import tempfile

    if args.combos:
        combos = [tuple(c.split("/", 1)) for c in args.combos.split(",")]
    else:
        combos = [(r, p) for r in args.runtime.split(",") for p in args.precision.split(",")
                  if not (r == "keras" and p == "int8") and not (r == "keras" and p == "fp16")]
    body, ctype = multipart(photo_jpeg())
    calibration = args.calibration_dir or calibration_folder(Path(tempfile.mkdtemp()) / "calibration")
    raws = {}
    for runtime, precision in combos:
        t0 = time.perf_counter()
        raws[(runtime, precision)] = load_raw(args.model, args.weights, args.batch_size, runtime=runtime,
                                              precision=precision, calibration_dir=calibration)
        print(f"loaded {runtime} {precision} in {time.perf_counter() - t0:.1f} s "
              f"(runs {raws[(runtime, precision)][0].precision})", flush=True)
    stacks = {}
    try:
        for runtime, precision in combos:
            env = {E("model"): args.model, E("weights"): args.weights,
                   E("batch_size"): str(args.batch_size), E("runtime"): runtime,
                   E("precision"): precision, E("calibration_dir"): calibration}
            # All stacks up at once (idle ones cost no CPU), so rounds can alternate between them.
            stacks[(runtime, precision)] = LocalStack(env=env).start(workers=1)
            load(stacks[(runtime, precision)].url, 2, 1.0, body, ctype)
        rounds: dict = {c: {"raw_img_s": [], "raw_b1_ms": [], "served16_img_s": [], "served1_p50_ms": [],
                            "served16_p50_ms": []} for c in combos}
        d = args.duration
        for i in range(args.rounds):
            order = combos if i % 2 == 0 else combos[::-1]
            for c in order:
                clf, x = raws[c]
                r = rounds[c]
                r["raw_img_s"].append(raw_throughput(clf, x, args.batch_size, d))
                r["raw_b1_ms"].append(float(np.median(raw_latencies(clf, x, d / 2))))
                s16 = load(stacks[c].url, 16, d, body, ctype)
                s1 = load(stacks[c].url, 1, d / 2, body, ctype)
                r["served16_img_s"].append(s16["throughput_img_s"])
                r["served16_p50_ms"].append(s16["p50_ms"])
                r["served1_p50_ms"].append(s1["p50_ms"])
                print(f"round {i + 1} {c[0]:8} {c[1]:4}: raw {r['raw_img_s'][-1]:6.1f} img/s, "
                      f"b1 {r['raw_b1_ms'][-1]:6.1f} ms; served@16 {s16['throughput_img_s']:6.1f} img/s "
                      f"(failures {s16['failures']}); p50@1 {s1['p50_ms']:6.1f} ms", flush=True)
    finally:
        for stack in stacks.values():
            stack.stop()
    rows = []
    base = rounds.get(("keras", "fp32"))
    print(f"\nruntime  precision runs  raw img/s  raw b1 ms  served@16 img/s  served/raw  p50@1 ms  "
          f"p50@16 ms  served@16 vs keras fp32   (median of {args.rounds} rounds; spread min-max)")
    for c in combos:
        r = rounds[c]
        med = {k: float(np.median(v)) for k, v in r.items()}
        spread = {k: [float(min(v)), float(max(v))] for k, v in r.items()}
        row = {"runtime": c[0], "precision": c[1], "runs": raws[c][0].precision, **med, "spread": spread,
               "served_over_raw": med["served16_img_s"] / med["raw_img_s"]}
        if base:
            row["speedup_served16_over_keras_fp32"] = med["served16_img_s"] / float(np.median(base["served16_img_s"]))
            row["speedup_raw_over_keras_fp32"] = med["raw_img_s"] / float(np.median(base["raw_img_s"]))
        rows.append(row)
        print(f"{c[0]:8} {c[1]:9} {row['runs']:5} {med['raw_img_s']:9.1f} {med['raw_b1_ms']:10.1f} "
              f"{med['served16_img_s']:16.1f} {row['served_over_raw']:11.2f} {med['served1_p50_ms']:9.1f} "
              f"{med['served16_p50_ms']:10.1f} {row.get('speedup_served16_over_keras_fp32', float('nan')):10.2f}x"
              f"    raw {spread['raw_img_s'][0]:.1f}-{spread['raw_img_s'][1]:.1f}, "
              f"served {spread['served16_img_s'][0]:.1f}-{spread['served16_img_s'][1]:.1f}")
    import openvino as ov

    result = {
        "model": args.model, "batch_size": args.batch_size, "duration_s_per_point": args.duration,
        "rounds": args.rounds, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine(), "cpu": ov.Core().get_property("CPU", "FULL_DEVICE_NAME"),
                    "openvino_capabilities": list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))},
        "results": rows,
    }
    write_result(args.out, "runtimes.json", result)
    return 0


def machine() -> dict:
    """What a figure was measured on: the ratios depend on these CPU flags."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "flags": sorted(f for f in _cpu_flags() if f.startswith(("avx", "amx", "fma")))}


def write_result(out_dir: str, name: str, result: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


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
    ap.add_argument("--runtime", default="", help="compare runtimes: e.g. keras,openvino")
    ap.add_argument("--precision", default="", help="with --runtime: e.g. fp32,bf16,int8")
    ap.add_argument("--rounds", type=int, default=3, help="with --runtime: alternating measurement rounds")
    ap.add_argument("--combos", default="", help="instead of --runtime x --precision: e.g. keras/fp32,openvino/auto")
    ap.add_argument("--calibration-dir", default=None, help="int8 calibration images (default: scikit-image photos)")
    args = ap.parse_args()
    if args.runtime or args.precision or args.combos:
        args.runtime = args.runtime or "keras,openvino"
        args.precision = args.precision or "fp32"
        return compare_runtimes(args)
    if args.quick:
        args.duration, args.clients, args.delays = 3.0, "1,8,32", "0,5"
    levels = [int(c) for c in args.clients.split(",")]
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    body, ctype = multipart(photo_jpeg())

    print(f"raw: {args.model} in process, the worker's compiled call", flush=True)
    clf, x = load_raw(args.model, args.weights, args.batch_size)
    tp_before = raw_throughput(clf, x, args.batch_size, args.duration)
    print(f"  batch {args.batch_size}: {tp_before:.1f} img/s", flush=True)

    env = {E("model"): args.model, E("weights"): args.weights, E("batch_size"): str(args.batch_size)}
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
            res = served_run({**env, E("max_batch_delay_ms"): str(d)}, [8], args.duration, body, ctype)[0]
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
        "machine": machine(),
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
