"""The pipeline behind `inferstack finetune`: read, features, search, (fine-tune), export."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import Example, Skipped, check_classes, list_items, scan, split
from .features import FeatureStats, compute_features, extract_batch
from .model import Backbone, assemble, head_for, load_backbone
from .report import (confusion_matrix, per_class_accuracy, plot_confusion, plot_search, write_calibration,
                     write_json)
from .search import (DEFAULT_SEARCH, SearchResult, make_trials, parse_search, run_search, spark_context,
                     top_k_accuracy)

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.txt"
METRICS_FILE = "metrics.json"
CALIBRATION_DIR = "calibration"


@dataclass
class Options:
    data: str
    out: str
    base: str = "ResNet50"
    weights: str = "imagenet"
    search: str = DEFAULT_SEARCH
    trials: int | None = None
    master: str = "local[*]"
    spark_conf: dict[str, str] = field(default_factory=dict)
    fine_tune_layers: int = 0
    fine_tune_lr: float | None = None  # default: a tenth of the best trial's
    fine_tune_epochs: int = 10
    val_split: float = 0.2
    seed: int = 0
    min_images: int = 5
    feature_layer: str | None = None
    image_size: int | None = None
    cache: str | None = None  # default: OUT/cache
    batch_size: int = 32
    progress: bool | None = None  # None: tqdm decides (on for a terminal)


def _say(message: str) -> None:
    print(f"inferstack finetune: {message}", file=sys.stderr, flush=True)


def _arrays(train: list[Example], val: list[Example], index: dict[str, int], features: np.ndarray,
            classes: int) -> dict[str, np.ndarray]:
    def rows(examples: list[Example]) -> np.ndarray:
        return features[[index[e.digest] for e in examples]]

    return {"x": rows(train), "y": np.array([e.label for e in train], np.int64), "xv": rows(val),
            "yv": np.array([e.label for e in val], np.int64), "classes": np.array(classes)}


def _check_export(path: Path, model: Any, backbone: Backbone, val: list[Example]) -> None:
    """The saved file loads the way the worker loads it and computes what the trained model does."""
    from inferstack_worker.model_files import load_model_file

    from .tune import pixel_batches

    x, _ = pixel_batches(val[:16], backbone.input_shape, 16)[0]
    loaded = load_model_file(str(path))
    got, want = np.asarray(loaded(x, training=False)), np.asarray(model(x, training=False))
    if not np.allclose(got, want, atol=1e-5):
        raise RuntimeError(f"the saved model disagrees with the trained one (max difference {np.abs(got - want).max()})")


def _search_metrics(result: Any, varied: list[str]) -> dict[str, Any]:
    trials = [{k: v for k, v in t.items() if k != "weights"} for t in result.trials]
    return {"varied": varied, "slots": result.slots, "executor_start_s": result.executor_start_s,
            "wall_s": result.wall_s, "sum_trial_s": result.sum_trial_s,
            "parallel_speedup": result.sum_trial_s / result.wall_s if result.wall_s else None,
            "best": result.best["index"], "trials": trials}


def _features_stage(opts: Options, out: Path, skipped: Skipped, stages: dict[str, float]) -> tuple[
        list[str], Backbone, list[Example], np.ndarray, FeatureStats]:
    """Read and digest every file, then the backbone's features for each usable one."""
    t = time.monotonic()
    labels, examples = scan(list_items(opts.data, skipped), skipped, opts.progress)
    stages["read_s"] = time.monotonic() - t
    check_classes(labels, examples, opts.min_images)  # before the long stage; again once decoded
    backbone = load_backbone(opts.base, opts.weights, opts.seed, opts.feature_layer, opts.image_size)
    kept, features, fstats = compute_features(
        examples, backbone.identity, backbone.input_shape, extract_batch(backbone.model),
        opts.cache or str(out / "cache"), skipped, opts.batch_size, opts.progress)
    stages["features_s"] = fstats.seconds
    for item in skipped.files:
        _say(f"skipped {item['path']}: {item['error']}")
    check_classes(labels, kept, opts.min_images)
    return labels, backbone, kept, features, fstats


def _search_stage(opts: Options, trials: list[dict[str, Any]], data: dict[str, np.ndarray],
                  stages: dict[str, float]) -> SearchResult:
    sc, started = spark_context(opts.master, opts.spark_conf)
    try:
        result = run_search(sc, trials, data, opts.progress)
    finally:
        if started:
            sc.stop()
    stages["search_s"] = result.executor_start_s + result.wall_s
    return result


def _best_model(backbone: Backbone, data: dict[str, np.ndarray], best: dict[str, Any]) -> Any:
    head = head_for(data, best["settings"])
    head.set_weights(best["weights"])
    return assemble(backbone, head)


def finetune(opts: Options) -> dict[str, Any]:
    """Run every stage and write OUT/{model.keras, labels.txt, metrics.json, *.png, calibration/}."""
    t_start = time.monotonic()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = parse_search(opts.search)
    trials = make_trials(grid, opts.trials, opts.seed)
    skipped = Skipped()
    stages: dict[str, float] = {}

    labels, backbone, kept, features, fstats = _features_stage(opts, out, skipped, stages)
    train, val = split(kept, opts.val_split, opts.seed)
    data = _arrays(train, val, {e.digest: i for i, e in enumerate(kept)}, features, len(labels))
    _say(f"{len(labels)} classes, {len(train)} training and {len(val)} validation images, "
         f"{backbone.dim} features each ({fstats.reused} cached, {fstats.computed} computed); "
         f"{len(trials)} trial(s) on {opts.master}")
    result = _search_stage(opts, trials, data, stages)
    best = result.best
    model = _best_model(backbone, data, best)

    tuned = None
    if opts.fine_tune_layers > 0:
        from .tune import fine_tune

        tuned = fine_tune(model, backbone, train, val, layers=opts.fine_tune_layers,
                          lr=opts.fine_tune_lr or best["settings"]["lr"] / 10, epochs=opts.fine_tune_epochs,
                          batch_size=opts.batch_size, seed=opts.seed, before_top1=best["val_top1"],
                          progress=opts.progress)
        stages["fine_tune_s"] = tuned["seconds"]

    t = time.monotonic()
    metrics = _export(out, model, backbone, labels, train, val, data, tuned is not None and tuned["kept"])
    stages["export_s"] = time.monotonic() - t
    metrics.update({
        "options": asdict(opts), "classes": labels, "base": backbone.identity,
        "images": {"train": len(train), "val": len(val), "skipped": skipped.files},
        "features": asdict(fstats), "search": _search_metrics(result, sorted(grid)),
        "fine_tune": tuned, "stages": stages, "wall_s": time.monotonic() - t_start,
    })
    metrics["best"]["settings"] = best["settings"]
    write_json(out / METRICS_FILE, metrics)
    plot_search(result.trials, sorted(grid) or ["lr"], best["index"], out / "search.png")
    return metrics


def _export(out: Path, model: Any, backbone: Backbone, labels: list[str], train: list[Example],
            val: list[Example], data: dict[str, np.ndarray], tuned: bool) -> dict[str, Any]:
    """Save model, labels and calibration images; evaluate the exported model on validation."""
    from .tune import predict

    if tuned:
        probs = predict(model, val, backbone.input_shape)
    else:  # the frozen base's features are what the model computes first: no need to decode again
        head = model.get_layer("head")
        probs = np.asarray(head(data["xv"], training=False))
    y = data["yv"]
    matrix = confusion_matrix(y, probs.argmax(axis=1), len(labels))
    tmp = out / f".{MODEL_FILE}.{os.getpid()}.keras"
    model.save(tmp)
    _check_export(tmp, model, backbone, val)
    os.replace(tmp, out / MODEL_FILE)
    (out / LABELS_FILE).write_text("\n".join(labels) + "\n", encoding="utf-8")
    calibration = write_calibration(train + val, out / CALIBRATION_DIR)  # training images first
    plot_confusion(matrix, labels, out / "confusion.png")
    return {"model": str(out / MODEL_FILE), "labels": str(out / LABELS_FILE), "calibration_images": calibration,
            "best": {"val_top1": top_k_accuracy(probs, y, 1), "val_top5": top_k_accuracy(probs, y, 5),
                     "per_class_accuracy": per_class_accuracy(matrix, labels),
                     "confusion_matrix": matrix.tolist()}}
