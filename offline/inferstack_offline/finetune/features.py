"""Stage 1: the frozen backbone's pooled features for every image, computed once.

Features live in Parquet under CACHE/features/<key>/, one row per image (its SHA-256 and its
feature vector), where <key> hashes what the features depend on (base model, weights, feature
layer, input size). Parts are written every few hundred images and on interruption, so a re-run
(or another search over the same data) computes only the images it has not seen.

`extract_batch` is the single place features are computed; a Spark embedding column can replace it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from inferstack.config import Settings
from inferstack.imaging import BadImage

from .dataset import Example, Skipped, load_pixels, read_file

FORMAT = 1  # bump when the stored layout or the meaning of a feature changes
PART_ROWS = 256  # images per Parquet part: what an interruption can lose at most
DECODE_THREADS = 4

FeatureFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class FeatureStats:
    reused: int = 0
    computed: int = 0
    seconds: float = 0.0
    folder: str = ""


def cache_folder(cache_root: str, identity: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps({**identity, "format": FORMAT}, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_root) / "features" / key


def extract_batch(model: Any) -> FeatureFn:
    """float32 images (n, h, w, c), 0..255 -> float32 features (n, d), in inference mode."""

    def run(batch: np.ndarray) -> np.ndarray:
        return np.asarray(model(batch, training=False), dtype=np.float32)

    return run


def read_cache(folder: Path) -> dict[str, np.ndarray]:
    """digest -> feature vector, from every complete part (a part being written is a .tmp file)."""
    import pyarrow.parquet as pq

    cached: dict[str, np.ndarray] = {}
    if not folder.is_dir():
        return cached
    for part in sorted(folder.glob("part-*.parquet")):
        table = pq.read_table(part)
        column = table.column("features").combine_chunks()
        vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(table), -1)
        cached.update(zip(table.column("digest").to_pylist(), vectors))
    return cached


def write_part(folder: Path, identity: dict[str, Any], digests: list[str], vectors: np.ndarray) -> None:
    """One Parquet part, written aside and renamed so a reader never sees half of it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "key.json"
    if not meta.exists():
        meta.write_text(json.dumps({**identity, "format": FORMAT}, indent=2, sort_keys=True) + "\n")
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1))
    table = pa.table({"digest": pa.array(digests, pa.string()),
                      "features": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
    name = f"part-{uuid.uuid4().hex}.parquet"
    tmp = folder / f".{name}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, folder / name)


def _decoded(todo: list[Example], input_shape: tuple[int, int, int], skipped: Skipped,
             batch_size: int) -> Iterator[tuple[list[Example], np.ndarray, int]]:
    """Batches of (examples, pixels, files tried); files that fail to decode are reported and left out."""
    settings = Settings.from_env()

    def one(e: Example) -> np.ndarray | str:
        try:
            return load_pixels(read_file(e.path, settings), input_shape, settings)
        except (BadImage, OSError) as exc:
            return getattr(exc, "strerror", None) or str(exc)

    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode") as pool:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            good, pixels = [], []
            for e, result in zip(chunk, pool.map(one, chunk)):
                if isinstance(result, str):
                    skipped.add(e.path, result)
                else:
                    good.append(e)
                    pixels.append(result)
            yield good, (np.stack(pixels) if pixels else np.zeros((0, *input_shape), np.float32)), len(chunk)


def compute_features(
    examples: list[Example],
    identity: dict[str, Any],
    input_shape: tuple[int, int, int],
    feature_fn: FeatureFn,
    cache_root: str,
    skipped: Skipped,
    batch_size: int = 32,
    progress: bool | None = None,
) -> tuple[list[Example], np.ndarray, FeatureStats]:
    """(examples that decoded, their features in the same order, what was reused and computed)."""
    from tqdm import tqdm

    t0 = time.monotonic()
    folder = cache_folder(cache_root, identity)
    cached = read_cache(folder)
    todo = [e for e in examples if e.digest not in cached]
    stats = FeatureStats(reused=len(examples) - len(todo), folder=str(folder))
    pending_digests: list[str] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending_digests:
            write_part(folder, identity, pending_digests, np.concatenate(pending))
            pending_digests.clear()
            pending.clear()

    bar = tqdm(total=len(todo), desc="features", unit="img", disable=None if progress is None else not progress)
    bar.set_postfix(cached=stats.reused)
    try:
        for good, pixels, tried in _decoded(todo, input_shape, skipped, batch_size):
            bar.update(tried)
            if not good:
                continue
            vectors = feature_fn(pixels)
            for e, v in zip(good, vectors):
                cached[e.digest] = v
            pending_digests.extend(e.digest for e in good)
            pending.append(vectors)
            stats.computed += len(good)
            if len(pending_digests) >= PART_ROWS:
                flush()
    finally:
        flush()  # an interrupted run keeps what it computed
        bar.close()
    kept = [e for e in examples if e.digest in cached]
    matrix = np.stack([cached[e.digest] for e in kept]) if kept else np.zeros((0, 0), np.float32)
    stats.seconds = time.monotonic() - t0
    return kept, matrix.astype(np.float32), stats
