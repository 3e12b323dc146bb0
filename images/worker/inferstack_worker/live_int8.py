"""int8 from live traffic (INFERSTACK_PRECISION=auto, INFERSTACK_AUTO_INT8=1).

The worker serves with the fastest float path and keeps a bounded reservoir of the decoded inputs
it really serves. Once the reservoir is full, a child process at the lowest CPU priority (os.nice
19 in the child, so quantization only takes cycles serving leaves idle) quantizes the float model
with NNCF on those inputs and compares int8 with float on them. The worker switches to int8 only
if the two agree (top-1 and mean top-5 overlap above the bounds) and int8 runs faster at the batch
size (on a tiny model int8's conversions can cost more than they save); otherwise it stays in float
and says why. Either verdict is kept in INFERSTACK_CACHE_DIR with the int8 IR, so the next start serves
int8 at once (or does not try again).
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .precision_choice import Trial

log = logging.getLogger("inferstack.worker")

# States the model info and the metric report.
COLLECTING, QUANTIZING, SWITCHED, REJECTED, FAILED = "collecting", "quantizing", "int8", "rejected", "failed"
TOP_K = 5
QUANTIZE_TIMEOUT_S = 3600


class Reservoir:
    """At most ``size`` inputs, a uniform sample of all offered so far (Vitter's algorithm R)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seen = 0
        self._items: list[np.ndarray] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.full = threading.Event()

    def offer(self, item: np.ndarray) -> None:
        with self._lock:
            self.seen += 1
            if len(self._items) < self.size:
                self._items.append(item.copy())
                if len(self._items) == self.size:
                    self.full.set()
                return
            slot = self._rng.randrange(self.seen)
            if slot < self.size:
                self._items[slot] = item.copy()

    def snapshot(self) -> np.ndarray:
        with self._lock:
            return np.stack(self._items)


def agreement(reference: np.ndarray, other: np.ndarray, k: int = TOP_K) -> tuple[float, float]:
    """(% of rows with the same top-1, mean % overlap of the top-k sets) between two (n, classes) outputs."""
    k = min(k, reference.shape[1])
    top1 = float(np.mean(reference.argmax(1) == other.argmax(1))) * 100
    ref_k = np.argsort(-reference, axis=1)[:, :k]
    oth_k = np.argsort(-other, axis=1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(ref_k.tolist(), oth_k.tolist())]
    return round(top1, 2), round(float(np.mean(overlap)) * 100, 2)


def verdict(top1: float, top5: float, min_top1: float, min_top5: float, samples: int,
            speeds: list[Trial]) -> dict[str, Any]:
    """Whether int8 may serve (agrees, and is faster than the float path), and the sentence that says why."""
    failures = []
    if top1 < min_top1:
        failures.append(f"top-1 agreement {top1:g}% < {min_top1:g}%")
    if top5 < min_top5:
        failures.append(f"top-{TOP_K} overlap {top5:g}% < {min_top5:g}%")
    said = f"on {samples} live input(s): top-1 agreement {top1:g}%, top-{TOP_K} overlap {top5:g}%"
    if failures:
        reason = "int8 disagrees with float: " + ", ".join(failures) + f" ({said})"
    else:
        reason = f"int8 agrees {said}"
        float_speed, int8_speed = speeds[0].images_per_s, speeds[-1].images_per_s
        if int8_speed <= float_speed:
            failures.append("slower")
            reason += (f", but runs slower than {speeds[0].precision} here "
                       f"({int8_speed:.1f} vs {float_speed:.1f} img/s at batch {speeds[0].batch_size})")
    return {"ok": not failures, "top1": top1, "top5": top5, "samples": samples, "reason": reason,
            "trials": [t.row() for t in speeds]}


def _paths(cache_dir: str, key: str) -> tuple[Path, Path]:
    base = Path(cache_dir) / "openvino" / f"{key}-live-int8"
    return base.with_suffix(".xml"), base.with_suffix(".json")


def cached(cache_dir: str | None, key: str | None) -> tuple[Path | None, dict[str, Any] | None]:
    """(the int8 IR a previous run switched to, or None; the previous verdict, or None)."""
    if not cache_dir or not key:
        return None, None
    xml, verdict_file = _paths(cache_dir, key)
    try:
        body = json.loads(verdict_file.read_text())
    except (OSError, ValueError):
        return None, None
    return (xml if body.get("ok") and xml.exists() else None), body


class LiveInt8:
    """Waits for the reservoir, quantizes in a niced child, switches the classifier if int8 agrees."""

    def __init__(self, float_model: Any, float_precision: str, reservoir: Reservoir, status: dict[str, Any],
                 switch: Callable[[Any], None], *, cache_dir: str | None, key: str | None,
                 min_top1: float, min_top5: float, batch_size: int, trials: int, threads: int = 0) -> None:
        self.float_model = float_model
        self.float_precision = float_precision
        self.reservoir = reservoir
        self.status = status
        self.switch = switch
        self.cache_dir, self.key = cache_dir, key
        self.min_top1, self.min_top5 = min_top1, min_top5
        self.timing = (batch_size, trials, threads)
        self.status.update(state=COLLECTING, samples=reservoir.size)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="auto-int8", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        self.reservoir.full.wait()
        self.status.update(state=QUANTIZING)
        log.info("auto int8: reservoir full (%d of %d input(s) seen); quantizing at low priority",
                 self.reservoir.size, self.reservoir.seen)
        try:
            self._quantize_and_decide()
        except Exception as exc:  # the float path keeps serving whatever went wrong here
            log.exception("auto int8 failed; staying in %s", self.float_precision)
            self.status.update(state=FAILED, reason=f"quantization failed: {exc}"[:500])

    def _quantize_and_decide(self) -> None:
        from . import openvino_runtime as ovr

        with tempfile.TemporaryDirectory(prefix="auto-int8-", dir=self._work_dir()) as tmp:
            work = Path(tmp)
            ovr.save_ir(self.float_model, work / "float.xml")
            np.save(work / "samples.npy", self.reservoir.snapshot())
            run_child(work, self.float_precision, self.min_top1, self.min_top5, *self.timing)
            body = json.loads((work / "verdict.json").read_text())
            xml = self._keep(work, body)
            if not body["ok"]:
                log.warning("auto int8: staying in %s: %s", self.float_precision, body["reason"])
                self.status.update(state=REJECTED, **_shown(body))
                return
            import openvino as ov

            self.switch(ov.Core().read_model(xml))
            log.info("auto int8: switched to int8: %s", body["reason"])
            self.status.update(state=SWITCHED, **_shown(body))

    def _work_dir(self) -> str | None:
        if not self.cache_dir:
            return None
        folder = Path(self.cache_dir) / "openvino"
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    def _keep(self, work: Path, body: dict[str, Any]) -> Path:
        """Move the int8 IR and the verdict into the cache (when there is one): the next start uses them."""
        if not self.cache_dir or not self.key:
            return work / "int8.xml"
        xml, verdict_file = _paths(self.cache_dir, self.key)
        if body["ok"]:
            os.replace(work / "int8.bin", xml.with_suffix(".bin"))
            os.replace(work / "int8.xml", xml)
        verdict_file.write_text(json.dumps(body))
        return xml


def _shown(body: dict[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in ("top1", "top5", "reason", "trials")}


def run_child(work: Path, float_precision: str, min_top1: float, min_top5: float, batch_size: int,
              trials: int, threads: int = 0) -> None:
    """threads: INFERSTACK_INFERENCE_THREADS, so both sides of the race run on what serving gets."""
    cmd = [sys.executable, "-m", "inferstack_worker.quantize_live", str(work), float_precision,
           str(min_top1), str(min_top5), str(batch_size), str(trials), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=QUANTIZE_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"the quantizing process exited {proc.returncode}: {proc.stderr[-1500:]}")
