"""INFERSTACK_PRECISION=auto: time each precision the device offers, serve the fastest, remember why.

The choice is measured, not named: on a CPU without AMX, OpenVINO's bf16 runs slower than its f32,
so picking bf16 "because the CPU lists it" lost a third of the throughput. Each candidate is timed
on a few batches at the configured batch size and at 1; the fastest at the batch size wins (batch
1 breaks near-ties). The table and the decision are kept in INFERSTACK_CACHE_DIR next to the
compiled blobs, keyed by CPU, model digest and library versions, so a restart skips the timing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger("inferstack.worker")

Call = Callable[[np.ndarray], Any]
# Within this fraction of the best batch throughput, the faster batch-1 latency decides.
NEAR_TIE = 0.03


@dataclass(frozen=True)
class Trial:
    precision: str  # what was asked for
    runs: str  # what the device ran it in (OpenVINO may run bf16 as f32)
    batch_ms: float  # best of the timed batches at the configured batch size
    single_ms: float  # best of the timed batches of 1
    batch_size: int

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.batch_ms * 1000 if self.batch_ms > 0 else float("inf")

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 2)}


def time_call(call: Call, shape: tuple[int, int, int], batch_size: int, trials: int) -> tuple[float, float]:
    """(best ms at batch_size, best ms at 1), each after one untimed call (first-run allocation)."""
    best = []
    for n in (batch_size, 1):
        x = np.zeros((n, *shape), np.float32)
        call(x)
        times = []
        for _ in range(trials):
            t0 = time.perf_counter()
            call(x)
            times.append((time.perf_counter() - t0) * 1000)
        best.append(min(times))  # the least disturbed run: this machine may be shared
    return best[0], best[1]


def fastest(trials: list[Trial]) -> Trial:
    top = max(t.images_per_s for t in trials)
    close = [t for t in trials if t.images_per_s >= top * (1 - NEAR_TIE)]
    return min(close, key=lambda t: t.single_ms)


def table(trials: list[Trial], chosen: str) -> str:
    lines = ["precision  runs   img/s (batch)  ms (batch 1)"]
    for t in trials:
        mark = "  <- chosen" if t.precision == chosen else ""
        lines.append(f"{t.precision:9}  {t.runs:5}  {t.images_per_s:13.1f}  {t.single_ms:12.2f}{mark}")
    return "\n".join(lines)


@dataclass
class Choice:
    """What auto chose and from what: the worker's model info and metrics show it."""

    chosen: str
    trials: list[Trial]
    measured: bool  # False: read from the decision cache

    def info(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "measured": self.measured, "trials": [t.row() for t in self.trials]}


def measure(compile_one: Callable[[str], tuple[Call, str]], candidates: list[str], shape: tuple[int, int, int],
            batch_size: int, trials: int) -> tuple[Choice, Call]:
    """Compile and time each candidate; (the choice, the chosen one's compiled call)."""
    results: list[Trial] = []
    calls: dict[str, Call] = {}
    for precision in candidates:
        call, runs = compile_one(precision)
        if any(t.runs == runs for t in results):
            log.info("precision %s runs as %s on this device, already timed: skipped", precision, runs)
            continue
        batch_ms, single_ms = time_call(call, shape, batch_size, trials)
        results.append(Trial(precision, runs, round(batch_ms, 3), round(single_ms, 3), batch_size))
        calls[precision] = call
    best = fastest(results)
    log.info("precision auto measured %d candidate(s) (%d timed batches each, batch %d and 1):\n%s",
             len(results), trials, batch_size, table(results, best.precision))
    return Choice(best.precision, results, measured=True), calls[best.precision]


def decision_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _decision_path(cache_dir: str, key: str) -> Path:
    return Path(cache_dir) / "openvino" / "precision" / f"{key}.json"


def read_decision(cache_dir: str | None, key: str | None) -> Choice | None:
    if not cache_dir or not key:
        return None
    path = _decision_path(cache_dir, key)
    try:
        body = json.loads(path.read_text())
        trials = [Trial(r["precision"], r["runs"], r["batch_ms"], r["single_ms"], r["batch_size"])
                  for r in body["trials"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    log.info("precision auto: using the decision cached at %s:\n%s", path, table(trials, body["chosen"]))
    return Choice(body["chosen"], trials, measured=False)


def write_decision(choice: Choice, cache_dir: str | None, key: str | None, parts: dict[str, Any]) -> None:
    if not cache_dir or not key:
        return
    path = _decision_path(cache_dir, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{key}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**choice.info(), "key": parts}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot cache the precision decision in %s: %s", cache_dir, exc)
