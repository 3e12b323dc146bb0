"""Stage 4: what the user takes away besides the model: metrics, plots, calibration images."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import Example


def confusion_matrix(y: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (y, predicted), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray, labels: list[str]) -> dict[str, float | None]:
    totals = matrix.sum(axis=1)
    return {label: (float(matrix[i, i] / totals[i]) if totals[i] else None) for i, label in enumerate(labels)}


def setting_text(settings: dict[str, Any], varied: list[str]) -> str:
    return " ".join(f"{name}={settings[name]:g}" for name in varied)


def plot_search(trials: list[dict[str, Any]], varied: list[str], best_index: int, path: Path) -> None:
    """Validation top-1 per setting, best first, the chosen one highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = sorted((t for t in trials if "error" not in t), key=lambda t: -t["val_top1"])
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(done) + 1.5))
    colors = ["tab:green" if t["index"] == best_index else "tab:blue" for t in done]
    ax.barh([setting_text(t["settings"], varied) for t in done], [t["val_top1"] for t in done], color=colors)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("validation top-1 accuracy")
    ax.set_title(f"hyperparameter search: {len(done)} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    side = min(4 + 0.4 * n, 40)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues")
    if n <= 50:  # beyond that, tick labels are unreadable anyway
        ax.set_xticks(range(n), labels, rotation=90)
        ax.set_yticks(range(n), labels)
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                dark = count > matrix.max() / 2
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("validation confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_calibration(examples: list[Example], folder: Path) -> int:
    """Copy up to the worker's calibration subset of training images, taking the classes in turn
    (the worker reads the folder in name order, so every class is represented)."""
    from inferstack_worker.openvino_runtime import CALIBRATION_IMAGES, IMAGE_SUFFIXES

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    by_class: dict[int, list[Example]] = {}
    for e in examples:
        if Path(e.path).suffix.lower() in IMAGE_SUFFIXES:
            by_class.setdefault(e.label, []).append(e)
    queues = [iter(members) for _, members in sorted(by_class.items())]
    written = 0
    while queues and written < CALIBRATION_IMAGES:
        for queue in list(queues):
            e = next(queue, None)
            if e is None:
                queues.remove(queue)
                continue
            if written == CALIBRATION_IMAGES:
                break
            shutil.copyfile(e.path, folder / f"{written:04d}{Path(e.path).suffix.lower()}")
            written += 1
    return written


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
