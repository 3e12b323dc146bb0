"""Stage 2: the hyperparameter search, each trial a Spark task that trains a head on cached features.

Why plain Spark tasks and not a library's Spark backend (Hyperopt's SparkTrials, joblib-spark):
a grid of a few dozen small Keras fits needs no adaptive sampler, and one task per trial keeps
the moving parts to PySpark alone. The features go to the executors once, as a broadcast; each
trial is submitted as its own one-task job from a driver thread, so trials run side by side on
every free slot, finish in any order (the progress bar follows them) and fail alone.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import numpy as np

from inferstack.config import ConfigError

# What a trial can vary, its type, and the value it takes when the search leaves it out.
PARAMS: dict[str, type] = {"lr": float, "dropout": float, "units": int, "l2": float, "epochs": int,
                           "batch": int, "patience": int}
DEFAULTS: dict[str, Any] = {"lr": 1e-3, "dropout": 0.2, "units": 0, "l2": 0.0, "epochs": 30, "batch": 32,
                            "patience": 5}
DEFAULT_SEARCH = "lr=1e-3,3e-4,1e-4 dropout=0.2,0.5 units=0,256"
# Executors each run one trial per core: one TensorFlow thread pool each, not one per core each.
TRIAL_ENV = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1",
             "TF_CPP_MIN_LOG_LEVEL": "2"}


def parse_search(text: str) -> dict[str, list[Any]]:
    """"lr=1e-3,3e-4 units=0,256" -> {"lr": [0.001, 0.0003], "units": [0, 256]}."""
    grid: dict[str, list[Any]] = {}
    for part in text.split():
        name, sep, values = part.partition("=")
        if not sep or not values or name not in PARAMS:
            raise ConfigError(f"--search: {part!r} is not NAME=V1,V2,... with NAME one of {', '.join(PARAMS)}")
        try:
            parsed = [float(v) for v in values.split(",")]
        except ValueError:
            raise ConfigError(f"--search: {part!r} holds a value that is not a number") from None
        if PARAMS[name] is int:
            if any(v != int(v) for v in parsed):
                raise ConfigError(f"--search: {part!r}: {name} takes whole numbers")
            parsed = [int(v) for v in parsed]
        if any(v < 0 for v in parsed) or (name in ("lr", "epochs", "batch") and any(v <= 0 for v in parsed)):
            raise ConfigError(f"--search: {part!r}: values must be positive")
        if name == "dropout" and any(v >= 1 for v in parsed):
            raise ConfigError(f"--search: {part!r}: dropout is a fraction below 1")
        grid[name] = list(dict.fromkeys(parsed))
    return grid


def make_trials(grid: dict[str, list[Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """Every combination of the grid (defaults for the rest), or `limit` of them drawn at random."""
    names = sorted(grid)
    combos = [dict(DEFAULTS, **dict(zip(names, values))) for values in itertools.product(*(grid[n] for n in names))]
    if limit is not None and limit < len(combos):
        combos = random.Random(seed).sample(combos, limit)
    return [{"index": i, "seed": seed + i, "settings": c} for i, c in enumerate(combos)]


def top_k_accuracy(probs: np.ndarray, y: np.ndarray, k: int) -> float:
    if len(y) == 0:
        return 0.0
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float(np.mean(np.any(top == y[:, None], axis=1)))


def train_trial(trial: dict[str, Any], data: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fit one head on the features (early stopping on validation loss); runs on an executor."""
    for name, value in TRIAL_ENV.items():
        os.environ.setdefault(name, value)
    import keras

    from .model import head_for

    start = time.time()
    s = trial["settings"]
    keras.utils.set_random_seed(trial["seed"])
    head = head_for(data, s)
    head.compile(optimizer=keras.optimizers.Adam(s["lr"]), loss="sparse_categorical_crossentropy")
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=s["patience"], restore_best_weights=True)
    history = head.fit(data["x"], data["y"], validation_data=(data["xv"], data["yv"]), epochs=s["epochs"],
                       batch_size=s["batch"], callbacks=[stop], verbose=0)
    probs = np.asarray(head.predict(data["xv"], batch_size=256, verbose=0))
    losses = history.history["val_loss"]
    end = time.time()
    return {
        "index": trial["index"], "settings": s,
        "val_top1": top_k_accuracy(probs, data["yv"], 1), "val_top5": top_k_accuracy(probs, data["yv"], 5),
        "val_loss": float(min(losses)), "epochs": len(losses), "best_epoch": int(np.argmin(losses)) + 1,
        "seconds": end - start, "start": start, "end": end, "worker": f"{socket.gethostname()}:{os.getpid()}",
        "weights": head.get_weights(),
    }


def _load_keras(_: Any) -> int:
    """Runs once per executor process: TensorFlow's import is paid before the search clock starts."""
    for name, value in TRIAL_ENV.items():
        os.environ.setdefault(name, value)
    import keras  # noqa: F401

    return os.getpid()


def spark_context(master: str, conf: dict[str, str] | None = None) -> tuple[Any, bool]:
    """(SparkContext, whether we started it). Local masters run executors on this interpreter."""
    from pyspark import SparkConf, SparkContext

    if master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # a local run listens on loopback only
    spark_conf = (SparkConf().setMaster(master).setAppName("inferstack-finetune")
                  .set("spark.ui.showConsoleProgress", "false").set("spark.python.worker.reuse", "true"))
    for name, value in TRIAL_ENV.items():
        spark_conf.set(f"spark.executorEnv.{name}", value)
    for name, value in (conf or {}).items():
        spark_conf.set(name, value)
    started = SparkContext._active_spark_context is None
    sc = SparkContext.getOrCreate(spark_conf)
    if started:
        sc.setLogLevel("ERROR")
    return sc, started


@dataclass
class SearchResult:
    trials: list[dict[str, Any]]  # in trial order; failed ones carry "error"
    wall_s: float
    slots: int
    executor_start_s: float  # executors importing TensorFlow, before the trials

    @property
    def finished(self) -> list[dict[str, Any]]:
        return [t for t in self.trials if "error" not in t]

    @property
    def best(self) -> dict[str, Any]:
        return max(self.finished, key=lambda t: (t["val_top1"], -t["val_loss"]))

    @property
    def sum_trial_s(self) -> float:
        return sum(t["seconds"] for t in self.finished)


def run_search(sc: Any, trials: list[dict[str, Any]], data: dict[str, np.ndarray],
               progress: bool | None = None) -> SearchResult:
    """Every trial as its own Spark job, all submitted at once; the features are broadcast once."""
    from tqdm import tqdm

    t0 = time.monotonic()
    slots = sc.defaultParallelism
    sc.parallelize(range(slots), slots).map(_load_keras).collect()
    executor_start = time.monotonic() - t0
    shared = sc.broadcast(data)

    def run_one(trial: dict[str, Any]) -> dict[str, Any]:
        sc.setJobGroup(f"trial-{trial['index']}", f"finetune trial {trial['index']}: {trial['settings']}")
        rdd = sc.parallelize([trial], 1).map(lambda t: train_trial(t, shared.value))
        return rdd.collect()[0]

    t0 = time.monotonic()
    results: dict[int, dict[str, Any]] = {}
    bar = tqdm(total=len(trials), desc="search", unit="trial", disable=None if progress is None else not progress)
    try:
        with ThreadPoolExecutor(min(len(trials), 64), thread_name_prefix="trial") as pool:
            futures = {pool.submit(run_one, t): t for t in trials}
            for future in as_completed(futures):
                trial = futures[future]
                try:
                    results[trial["index"]] = future.result()
                except Exception as exc:  # a failed trial (bad settings, executor lost) fails alone
                    results[trial["index"]] = {"index": trial["index"], "settings": trial["settings"],
                                               "error": _first_line(exc)}
                bar.update(1)
                done = [r for r in results.values() if "error" not in r]
                if done:
                    bar.set_postfix(best=f"{max(r['val_top1'] for r in done):.3f}")
    except BaseException:
        sc.cancelAllJobs()
        raise
    finally:
        bar.close()
        shared.unpersist()
    wall = time.monotonic() - t0
    ordered = [results[t["index"]] for t in trials]
    if not any("error" not in r for r in ordered):
        raise RuntimeError(f"every trial failed; the first: {ordered[0]['error']}")
    return SearchResult(ordered, wall, slots, executor_start)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # A Python error inside a Spark task arrives wrapped in a Java stack trace: keep its own line.
    for line in reversed(text.splitlines()):
        if "Error:" in line or "Exception:" in line:
            return line.strip()[:500]
    return (text.splitlines() or [type(exc).__name__])[0][:500]
