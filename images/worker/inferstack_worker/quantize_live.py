"""The auto-int8 child: `python -m inferstack_worker.quantize_live WORK FLOAT_PRECISION MIN_TOP1 MIN_TOP5
BATCH_SIZE TRIALS [THREADS]`.

Runs at the lowest CPU priority (os.nice(19) before anything heavy): it quantizes WORK/float.xml
with NNCF on the live inputs in WORK/samples.npy, compares int8 with the float precision served on
them (answers, and speed at the batch size), and writes WORK/verdict.json (and WORK/int8.xml when
int8 agrees and is faster).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 32
# The float-vs-int8 race runs niced on a machine that is serving: at least this many rounds.
MIN_TRIALS = 5


def _race(entrants: list[tuple[str, str, object]], shape: tuple[int, int, int], batch_size: int,
          rounds: int) -> list[Any]:
    """Time the entrants in alternation, one batch each per round (a busy moment slows both alike)."""
    from .precision_choice import Trial, time_call

    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for precision, _runs, call in entrants:
            batch_ms, single_ms = time_call(call, shape, batch_size, 1)  # type: ignore[arg-type]
            old = best.get(precision, (float("inf"), float("inf")))
            best[precision] = (min(old[0], batch_ms), min(old[1], single_ms))
    return [Trial(p, runs, round(best[p][0], 3), round(best[p][1], 3), batch_size) for p, runs, _ in entrants]


def _outputs(call: object, x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(call(x[i:i + BATCH])).reshape(len(x[i:i + BATCH]), -1)  # type: ignore[operator]
                           for i in range(0, len(x), BATCH)])


def main(argv: list[str]) -> None:
    os.nice(19)
    work, float_precision = Path(argv[0]), argv[1]
    min_top1, min_top5 = float(argv[2]), float(argv[3])
    batch_size, trials = int(argv[4]), int(argv[5])
    threads = int(argv[6]) if len(argv) > 6 else 0  # INFERSTACK_INFERENCE_THREADS of the serving worker
    import openvino as ov

    from . import openvino_runtime as ovr
    from .classifier import prepare_pixels
    from .live_int8 import agreement, verdict

    float_model = ov.Core().read_model(work / "float.xml")
    shape = ovr.input_shape_of(float_model)
    x = np.stack([prepare_pixels(p, shape) for p in np.load(work / "samples.npy")])
    int8_model = ovr.quantize(float_model, [x[i:i + 1] for i in range(len(x))])
    float_call, float_runs = ovr.compile_call(float_model, float_precision, None, threads)
    int8_call, _ = ovr.compile_call(int8_model, "int8", None, threads)
    top1, top5 = agreement(_outputs(float_call, x), _outputs(int8_call, x))
    speeds = _race([(float_precision, float_runs, float_call), ("int8", "int8", int8_call)], shape, batch_size,
                   max(trials, MIN_TRIALS))
    body = verdict(top1, top5, min_top1, min_top5, len(x), speeds)
    if body["ok"]:
        ovr.save_ir(int8_model, work / "int8.xml")
    (work / "verdict.json").write_text(json.dumps(body))


if __name__ == "__main__":
    main(sys.argv[1:])
