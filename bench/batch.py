"""`inferstack batch` on Spark vs the raw runtime vs `inferstack classify`, side by side in one run.

On one folder of real photos of mixed sizes (crops of scikit-image's photographs, 150..1600 px,
JPEG and PNG), for each precision (the default, and OpenVINO int8 calibrated on those photos):

1. raw: the worker's classifier in this process, prepared batches of `--batch-size`, no decoding;
2. batch: `inferstack batch FOLDER --master local[N]` for N = 1 and 2; steady-state throughput
   from the per-partition lines (after the first wave of partitions, which loads the model);
   partitions of 4 model batches (`--partitions` = images / (4 x batch); the CLI's default is 8):
   a partition's first batch decodes before inference can start, so one batch a partition (this
   bench before) measured that stall, not the pipeline;
3. classify: `inferstack classify FOLDER --concurrency 8` through a local stack (redis-server,
   one worker, gunicorn: tools.devstack) with the same model settings.

Ratios: batch local[2] / raw (goal >= 0.85), batch local[2] / classify (goal >= 1.5),
local[2] / local[1]. Raw is measured before and after each of the three runs, and each run is
divided by the mean of the raws beside it (this VM's speed drifts by up to 1.7x in minutes); the
raw step also gives the CPU per image of the model and of decoding the folder, hence the most
batch / raw can reach on these cores: model / (model + decode). Without cached ImageNet weights
ResNet50 gets random weights, saved to a file so every process (and OpenVINO's conversion cache)
shares them: same speed, meaningless labels.
Usage: python bench/batch.py [--images 768] [--batch-size 32] [--precisions default,int8] [--png-every 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inferstack.client import iter_images  # noqa: E402
from inferstack.config import Settings  # noqa: E402
from inferstack.imaging import decode_image  # noqa: E402
from tools.devstack import LocalStack, weights_fallback_env  # noqa: E402

BIN = Path(sys.executable).parent
PART_LINE = re.compile(r"inferstack batch: part-\S+: (\d+) rows")
CALIBRATION_IMAGES = 128


def make_photos(folder: Path, count: int, png_every: int = 4) -> None:
    """Random crops of real photographs, resized to 150..1600 px, as JPEG, and every png_every-th as
    PNG (0: JPEG only, as cameras write them)."""
    import skimage.data
    from PIL import Image

    sources = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket(),
               skimage.data.retina(), skimage.data.immunohistochemistry(), skimage.data.hubble_deep_field()]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        side = int(rng.uniform(150, 1600))
        im = Image.fromarray(np.ascontiguousarray(src[y:y + ch, x:x + cw, :3])).resize((side, side * ch // cw))
        if png_every and i % png_every == png_every - 1:
            im.save(folder / f"photo{i:04d}.png")
        else:
            im.save(folder / f"photo{i:04d}.jpg", quality=90)


def random_weights(model: str, path: Path) -> str:
    """The architecture's random initial weights, saved once so every process shares them."""
    import keras

    if not path.exists():
        keras.utils.set_random_seed(0)
        getattr(keras.applications, model)(weights=None).save_weights(path)
    return str(path)


def raw_rate(env: dict[str, str], folder: Path, batch_size: int, seconds: float) -> dict[str, object]:
    """The worker's classifier in process (also fills the OpenVINO cache the others reuse), with the
    CPU it spends per image, beside the CPU decoding spends per image of the folder."""
    from inferstack_worker.model import load_classifier

    clf = load_classifier(Settings.from_env(env))
    files = list(iter_images([folder]))[:batch_size]
    batch = np.stack([clf.prepare(decode_image(Path(f).read_bytes(), clf.input_shape[:2])) for f in files])
    clf.predict(batch)
    n, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds or n < 3:
        clf.predict(batch)
        n += 1
    rate, model_cpu = n * batch_size / (time.perf_counter() - t0), (time.process_time() - cpu0) / (n * batch_size)
    decode_cpu = decode_cpu_s(folder, clf.input_shape[:2])
    return {"img_s": rate, "runtime": clf.runtime, "precision": clf.precision,
            "model_cpu_ms_per_img": 1000 * model_cpu, "decode_cpu_ms_per_img": 1000 * decode_cpu,
            # Batch must decode every image on the same cores, raw does not: its rate is at most this
            # share of raw's, with nothing else (Spark, Arrow, writing) costing anything.
            "batch_over_raw_ceiling": model_cpu / (model_cpu + decode_cpu)}


def decode_cpu_s(folder: Path, size: tuple[int, int], sample: int = 256) -> float:
    """CPU seconds per image to decode the folder as the batch job does (one thread, this process),
    over its first `sample` files (the formats alternate, so any run of them keeps the mix)."""
    files = list(iter_images([folder]))[:sample]
    t0 = time.process_time()
    for f in files:
        decode_image(Path(f).read_bytes(), size)
    return (time.process_time() - t0) / len(files)


def batch_rate(env: dict[str, str], folder: Path, master: str, batch_size: int, partitions: int,
               work: Path) -> dict[str, object]:
    """`inferstack batch` as a user runs it; steady state from the per-partition lines' arrival."""
    out = work / f"out-{master.strip('local[]')}-{time.monotonic_ns()}.parquet"
    argv = [str(BIN / "inferstack"), "batch", str(folder), "--out", str(out), "--master", master,
            "--batch-size", str(batch_size), "--partitions", str(partitions)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    parts: list[tuple[float, int]] = []
    tail: list[str] = []
    for line in proc.stderr:  # type: ignore[union-attr]
        match = PART_LINE.search(line)
        if match:
            parts.append((time.monotonic(), int(match.group(1))))
        tail = (tail + [line])[-20:]
    if proc.wait() != 0:
        raise RuntimeError(f"inferstack batch failed:\n{''.join(tail)}")
    wall = time.monotonic() - t0
    wave = int(master.strip("local[]") or 1)
    steady = parts[wave - 1:]  # from the end of the first wave (model loads) to the last part
    rows = sum(n for _, n in steady[1:])
    return {"img_s": rows / (steady[-1][0] - steady[0][0]), "wall_s": wall, "rows": sum(n for _, n in parts),
            "parts": len(parts), "end_to_end_img_s": sum(n for _, n in parts) / wall}


def classify_rate(env: dict[str, str], folder: Path, batch_size: int, work: Path) -> dict[str, object]:
    """`inferstack classify` through a local stack with the same model settings."""
    with LocalStack(env={**env, "INFERSTACK_BATCH_SIZE": str(batch_size)}, log_dir=str(work / "logs")) as stack:
        stack.start(workers=1)
        out = work / f"classify-{time.monotonic_ns()}.jsonl"
        t0 = time.monotonic()
        proc = subprocess.run([str(BIN / "inferstack"), "classify", str(folder), "--url", stack.url,
                               "--concurrency", "8", "--out", str(out), "--no-progress"],
                              capture_output=True, text=True, env={**os.environ, **env})
        wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"inferstack classify failed:\n{proc.stderr[-2000:]}")
    rows = len(out.read_text().splitlines())
    return {"img_s": rows / wall, "wall_s": wall, "rows": rows}


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "vnni")))
    return []


def measure(precision: str, base: dict[str, str], folder: Path, args: argparse.Namespace,
            work: Path) -> dict[str, object]:
    """Raw before and after each of the three runs: each ratio divides by the mean of the raw rates
    measured just before and just after it, since this VM's speed drifts by up to 1.7x in minutes."""
    env = dict(base)
    if precision == "int8":
        env.update(INFERSTACK_RUNTIME="openvino", INFERSTACK_PRECISION="int8",
                   INFERSTACK_CALIBRATION_DIR=str(work / "calibration"))
    print(f"[{precision}] raw ...", file=sys.stderr, flush=True)
    raws = [raw_rate(env, folder, args.batch_size, args.seconds)]
    result: dict[str, object] = {}
    for master in ("local[1]", "local[2]", "classify"):
        label = "inferstack classify" if master == "classify" else f"inferstack batch --master {master}"
        print(f"[{precision}] {label} ... then raw", file=sys.stderr, flush=True)
        if master == "classify":
            result["classify"] = classify_rate(env, folder, args.batch_size, work)
        else:
            result[f"batch_{master}"] = batch_rate(env, folder, master, args.batch_size, args.partitions, work)
        raws.append(raw_rate(env, folder, args.batch_size, args.seconds))
    rate = {k: float(v["img_s"]) for k, v in result.items()}  # type: ignore[index]
    beside = {k: (raws[i]["img_s"] + raws[i + 1]["img_s"]) / 2 for i, k in enumerate(rate)}  # type: ignore[operator]
    means = ("img_s", "batch_over_raw_ceiling", "decode_cpu_ms_per_img", "model_cpu_ms_per_img")
    result["raw"] = {**raws[0], **{k: float(np.mean([r[k] for r in raws])) for k in means},
                     "img_s_before_and_after_each_run": [r["img_s"] for r in raws]}
    result["ratios"] = {
        "batch_local2_over_raw": rate["batch_local[2]"] / beside["batch_local[2]"],
        # classify's rate over the raw beside it, and batch's: their quotient compares the two.
        "batch_local2_over_classify": (rate["batch_local[2]"] / beside["batch_local[2]"])
        / (rate["classify"] / beside["classify"]),
        "local2_over_local1": (rate["batch_local[2]"] / beside["batch_local[2]"])
        / (rate["batch_local[1]"] / beside["batch_local[1]"]),
        # batch gets little past raw (it decodes too; one-thread models per task gain a few percent),
        # so batch / classify cannot go much past raw / classify.
        "raw_over_classify": beside["classify"] / rate["classify"],
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ResNet50")
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--partitions", type=int, default=0, help="0: images / (4 x batch size)")
    parser.add_argument("--seconds", type=float, default=15.0, help="raw measurement time")
    parser.add_argument("--precisions", default="default,int8")
    parser.add_argument("--png-every", type=int, default=4, help="every Nth photo a PNG (0: JPEG only)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "batch.json"))
    parser.add_argument("--weights", choices=("auto", "random"), default="auto",
                        help="auto: ImageNet's where cached, else random (saved to a file all processes share)")
    args = parser.parse_args()
    args.partitions = args.partitions or max(1, args.images // (4 * args.batch_size))
    work = Path(tempfile.mkdtemp(prefix="inferstack-bench-batch-"))
    folder = work / "photos"
    make_photos(folder, args.images, args.png_every)
    calibration = work / "calibration"
    calibration.mkdir()
    for f in sorted(folder.iterdir())[:CALIBRATION_IMAGES]:
        (calibration / f.name).symlink_to(f)
    base = {"INFERSTACK_MODEL": args.model, "INFERSTACK_BATCH_SIZE": str(args.batch_size),
            "INFERSTACK_CACHE_DIR": str(work / "cache"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if args.weights == "random" or (args.weights == "auto" and weights_fallback_env("bench/batch.py")):
        base["INFERSTACK_WEIGHTS"] = random_weights(args.model, work / f"{args.model}-random.weights.h5")
    results = {p: measure(p, base, folder, args, work) for p in args.precisions.split(",")}
    report = {"model": args.model, "images": args.images, "png_every": args.png_every, "batch_size": args.batch_size,
              "partitions": args.partitions,
              "weights": "random (not cached here)" if "INFERSTACK_WEIGHTS" in base else "imagenet",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_flags": cpu_flags(),
                          "load_average_at_end": os.getloadavg()},
              "results": results}
    for precision, r in results.items():
        print(f"{precision:8s} raw {r['raw']['img_s']:6.1f}  batch local[1] {r['batch_local[1]']['img_s']:6.1f}  "
              f"local[2] {r['batch_local[2]']['img_s']:6.1f}  classify {r['classify']['img_s']:6.1f} img/s; "
              + "  ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items())
              + f"; ceiling of batch/raw (decode {r['raw']['decode_cpu_ms_per_img']:.1f} ms, model "
                f"{r['raw']['model_cpu_ms_per_img']:.1f} ms CPU an image) {r['raw']['batch_over_raw_ceiling']:.2f}")
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
