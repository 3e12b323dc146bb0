"""What to train on: labelled image files from class folders or a table, read the way serving reads.

Every image goes through the web tier's bounded decoder (`inferstack.imaging.decode_image`) and the
worker's own `prepare_pixels`, so the model is trained on exactly the pixels it will be served.
Files that cannot be used are reported (path and reason) and skipped, never fatal.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inferstack.config import Settings
from inferstack.imaging import BadImage, decode_image

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")


class DataError(ValueError):
    """The data set as a whole cannot be trained on; the message says what to change."""


@dataclass(frozen=True)
class Item:
    path: str
    label: str


@dataclass(frozen=True)
class Example:
    """A usable image: where it is, its class index and the SHA-256 of its bytes (the cache key)."""

    path: str
    label: int
    digest: str


@dataclass
class Skipped:
    """Files left out, with the reason a user can act on."""

    files: list[dict[str, str]] = field(default_factory=list)

    def add(self, path: str, reason: str) -> None:
        self.files.append({"path": path, "error": reason})


def list_items(data: str, skipped: Skipped) -> list[Item]:
    """DATA is a folder with one sub-folder per class, or a table (.csv/.tsv/.jsonl/.parquet) with
    columns `path` and `label` (relative paths are relative to the table's folder)."""
    root = Path(data)
    if root.is_dir():
        return _folder_items(root, skipped)
    if root.is_file() and root.suffix.lower() in TABLE_SUFFIXES:
        return _table_items(root, skipped)
    if not root.exists():
        raise DataError(f"{data} does not exist; give a folder with one sub-folder per class, or a table")
    raise DataError(f"{data} is neither a folder of class folders nor a table ({', '.join(TABLE_SUFFIXES)})")


def _folder_items(root: Path, skipped: Skipped) -> list[Item]:
    items: list[Item] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            skipped.add(str(entry), "not inside a class folder (DATA holds one folder per class)")
            continue
        for folder, dirs, files in os.walk(entry):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            items.extend(Item(os.path.join(folder, f), entry.name) for f in sorted(files) if not f.startswith("."))
    if not items:
        raise DataError(f"{root} holds no class folders with files in them (expected {root}/<class>/<image>)")
    return items


def _table_rows(table: Path) -> list[dict[str, object]]:
    suffix = table.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(table).to_pylist()
    if suffix == ".jsonl":
        with table.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    with table.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))


def _table_items(table: Path, skipped: Skipped) -> list[Item]:
    try:
        rows = _table_rows(table)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the table {table}: {exc}") from None
    if rows and not {"path", "label"} <= set(rows[0]):
        raise DataError(f"the table {table} needs columns 'path' and 'label'; it has {', '.join(map(str, rows[0]))}")
    items = []
    for n, row in enumerate(rows, start=1):
        path, label = row.get("path"), row.get("label")
        if not path or label is None or str(label).strip() == "":
            skipped.add(f"{table}:{n}", "row without a path or a label")
            continue
        full = Path(str(path)) if os.path.isabs(str(path)) else table.parent / str(path)
        items.append(Item(str(full), str(label).strip()))
    if not items:
        raise DataError(f"the table {table} lists no images")
    return items


def read_file(path: str, settings: Settings) -> bytes:
    """The file's bytes, refusing (like the web tier) anything over the upload size limit."""
    size = os.path.getsize(path)
    if size > settings.max_image_bytes:
        raise BadImage(f"the file is {size} bytes, over the upload limit of {settings.max_image_bytes} "
                       "(INFERSTACK_MAX_IMAGE_BYTES); the served model could not be sent it either")
    with open(path, "rb") as fh:
        return fh.read()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_pixels(data: bytes, input_shape: tuple[int, int, int], settings: Settings) -> np.ndarray:
    """Encoded image -> float32 (h, w, c) model input, exactly as /predict and the worker do it."""
    from inferstack_worker.model import prepare_pixels

    pixels = decode_image(data, input_shape[:2], settings.max_image_pixels, settings.max_decode_bytes)
    return prepare_pixels(pixels, input_shape)


def scan(items: list[Item], skipped: Skipped, progress: bool | None = None) -> tuple[list[str], list[Example]]:
    """Read every file once for its digest: (class names, examples). Unreadable files, duplicates
    within a class and files labelled with two classes are skipped."""
    from tqdm import tqdm

    settings = Settings.from_env()
    labels = sorted({item.label for item in items})
    index = {label: i for i, label in enumerate(labels)}
    seen: dict[str, Example] = {}
    conflicts: set[str] = set()
    for item in tqdm(items, desc="reading", unit="file", disable=None if progress is None else not progress):
        try:
            d = digest(read_file(item.path, settings))
        except (OSError, BadImage) as exc:
            skipped.add(item.path, getattr(exc, "strerror", None) or str(exc))
            continue
        first = seen.get(d)
        if first is None:
            seen[d] = Example(item.path, index[item.label], d)
        elif first.label == index[item.label]:
            skipped.add(item.path, f"the same image as {first.path}")
        else:
            skipped.add(item.path, f"the same image as {first.path}, which is labelled {labels[first.label]!r}")
            conflicts.add(d)
    for d in conflicts:
        first = seen.pop(d)
        skipped.add(first.path, "the same image is also given another label; left out of both")
    return labels, list(seen.values())


def check_classes(labels: list[str], examples: list[Example], min_images: int) -> None:
    """Refuse to train when a class has too few usable images, naming every such class."""
    counts = np.bincount([e.label for e in examples], minlength=len(labels))
    small = [f"{labels[i]} ({counts[i]})" for i in range(len(labels)) if counts[i] < min_images]
    if small:
        raise DataError(
            f"{len(small)} class(es) have fewer than {min_images} usable images: {', '.join(small)}. "
            "Add images, remove those class folders (or table rows), or lower --min-images."
        )
    if len(labels) < 2:
        raise DataError(f"only one class ({labels[0] if labels else 'none'}): a classifier needs at least two")


def split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Stratified train/validation split, stable across runs: it depends on file contents and the
    seed, not on listing order. Each class keeps at least one image on each side."""
    by_class: dict[int, list[Example]] = {}
    for e in examples:
        by_class.setdefault(e.label, []).append(e)
    train: list[Example] = []
    val: list[Example] = []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda e: hashlib.sha256(f"{seed}:{e.digest}".encode()).digest())
        n_val = min(max(1, round(val_fraction * len(members))), len(members) - 1)
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return train, val
