"""Raw throughput of each OpenVINO precision side by side, and what INFERSTACK_PRECISION=auto picks.

    .venv/bin/python bench/precision_auto.py [--model ResNet50] [--batch-size 32] [--trials 5]

Random weights (INFERSTACK_WEIGHTS=none) run at the same speed as ImageNet's; int8 is calibrated on
scikit-image's photos. Every explicit precision hint is compiled and timed, whether or not the CPU
lists it (then OpenVINO runs f32: the "runs" column), then the worker's own auto path loads the
model and measures the candidates it would consider. Ratios only: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "images" / "worker")]

from inferstack.config import Settings  # noqa: E402
from inferstack_worker import openvino_runtime as ovr  # noqa: E402
from inferstack_worker import precision_choice as pc  # noqa: E402
from inferstack_worker.loading import load_keras_model  # noqa: E402
from inferstack_worker.model import load_classifier  # noqa: E402

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8",
         "amx_fp16")


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in FLAGS if f in have]
    return []


def calibration_folder() -> str:
    import skimage.data
    from PIL import Image

    folder = tempfile.mkdtemp(prefix="calibration-")
    for name in ("chelsea", "coffee", "astronaut", "rocket", "camera", "cat", "immunohistochemistry"):
        img = getattr(skimage.data, name)()
        Image.fromarray(img).convert("RGB").save(f"{folder}/{name}.png")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ResNet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    calibration = calibration_folder()
    settings = Settings(model=args.model, weights="none", runtime="openvino", precision="auto",
                        calibration_dir=calibration, batch_size=args.batch_size, precision_trials=args.trials)
    # auto with a calibration folder: the worker's own measurement over what the CPU lists, plus int8.
    clf = load_classifier(settings)
    auto = clf.choice["auto"]
    model, preprocess = load_keras_model(settings)
    float_model = ovr.convert(model, preprocess, clf.input_shape)
    rows = [pc.Trial(p, runs, *pc.time_call(call, clf.input_shape, args.batch_size, args.trials), args.batch_size)
            for p in ("fp32", "bf16", "fp16") for call, runs in [ovr.compile_call(float_model, p, None)]]
    print(json.dumps({"cpu": ovr.device_name(), "flags": cpu_flags(), "listed": ovr.device_precisions(),
                      "explicit": [r.row() for r in rows], "auto": auto}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
