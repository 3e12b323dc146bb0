"""`inferstack batch` and the Spark column functions on real PySpark (local mode), checked against
what a real local stack's `/predict` answers for the same files."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from inferstack.client import Client, ClassifyError
from inferstack.config import Settings
from inferstack_offline.batch import run
from tests.conftest import digits_env, jpeg_bytes, png_bytes
from tests.dataplane.test_poison import wait_for

CLI = str(Path(sys.executable).with_name("inferstack"))
BAD = {"truncated.jpg", "bomb16.png", "notes.png", "noise.jpg"}


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def env(digits_model) -> dict[str, str]:
    # Runtime and precision pinned for both sides; a 64 MiB decode budget makes the bomb a bomb.
    return digits_env(digits_model, INFERSTACK_RUNTIME="openvino", INFERSTACK_MAX_DECODE_BYTES=str(64 << 20))


@pytest.fixture(scope="module")
def settings(env) -> Settings:
    return Settings.from_env(env)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, digits_model, photos) -> Path:
    """200 files: digits as JPEG, PNG, grayscale PNG and JPEG; real photos; four bad ones."""
    root = tmp_path_factory.mktemp("dataset")
    digits = digits_model["x_test"]
    for i in range(192):
        img = Image.fromarray(digits[i])
        kind = i % 4
        sub = root / f"shard{i % 3}"
        sub.mkdir(exist_ok=True)
        if kind == 0:
            (sub / f"d{i:03d}.jpg").write_bytes(jpeg_bytes(digits[i]))
        elif kind == 1:
            (sub / f"d{i:03d}.png").write_bytes(png_bytes(digits[i]))
        elif kind == 2:
            (sub / f"d{i:03d}.png").write_bytes(encode(img.convert("L"), "PNG"))
        else:
            (sub / f"d{i:03d}.jpeg").write_bytes(encode(img.convert("L"), "JPEG", quality=85))
    for name, data in photos.items():
        (root / name).write_bytes(data)
    good = jpeg_bytes(digits[0])
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    # 6000x6000 16-bit grey: ~70 KB on disk, 69 MiB decoded: over the 64 MiB budget.
    (root / "bomb16.png").write_bytes(encode(Image.new("I;16", (6000, 6000), 1000), "PNG", compress_level=9))
    (root / "notes.png").write_text("not an image\n")
    (root / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "README.txt").write_text("skipped: not an image suffix\n")
    return root


def image_files(folder: Path) -> list[str]:
    from inferstack.client import iter_images

    return list(iter_images([folder]))


def read_out(out: Path) -> list[dict]:
    if out.suffix == ".jsonl":
        return [json.loads(line) for line in out.read_text().splitlines()]
    return pq.read_table(out).to_pylist()


@pytest.fixture(scope="module")
def served(make_stack, env, folder) -> dict[str, object]:
    """What /predict answers for every file: predictions, or (status, error)."""
    stack = make_stack(workers=1, env=env)
    client = Client(stack.url, top_k=5, retries=2)
    answers: dict[str, object] = {}
    for path in image_files(folder):
        try:
            answers[path] = client.classify_file(path)
        except ClassifyError as exc:
            answers[path] = (exc.status, exc.message)
    return answers


def assert_same_as_served(rows: list[dict], served: dict[str, object]) -> None:
    for row in rows:
        answer = served[row["path"]]
        if isinstance(answer, tuple):
            assert answer[0] == 400 and row["predictions"] is None, (row, answer)
            assert row["error"] == answer[1], row["path"]
            continue
        assert row["error"] is None, row
        assert [p["label"] for p in row["predictions"]] == [p["label"] for p in answer], row["path"]
        # Same model, runtime, precision and pixels; only the batch around each image differs
        # (equal to the bit on this CPU; wider SIMD kernels may sum in a batch-dependent order).
        np.testing.assert_allclose([p["probability"] for p in row["predictions"]],
                                   [p["probability"] for p in answer], rtol=0, atol=1e-6, err_msg=row["path"])


def test_folder_to_parquet_every_row_once_in_order_and_as_predict_answers(spark, settings, folder, served,
                                                                          tmp_path):
    out = tmp_path / "out.parquet"
    summary = run(str(folder), str(out), batch_size=16, partitions=5, settings=settings, spark=spark)
    rows = read_out(out)
    paths = image_files(folder)
    assert [r["path"] for r in rows] == paths  # one row per file, in the listing's order
    assert (summary.written, summary.errors, summary.parts) == (200, 4, 5)
    assert {Path(r["path"]).name for r in rows if r["error"]} == BAD
    assert "over the limit of 64 MiB" in next(r["error"] for r in rows if r["path"].endswith("bomb16.png"))
    assert_same_as_served(rows, served)
    # A re-run finds everything done and writes nothing.
    again = run(str(folder), str(out), batch_size=16, settings=settings, spark=spark)
    assert (again.written, again.skipped) == (0, 200)
    assert len(read_out(out)) == 200


def test_table_with_content_to_jsonl(spark, settings, folder, served, tmp_path):
    """A Parquet table of encoded files (the `content` column) in, JSON Lines out."""
    import pyarrow as pa

    paths = image_files(folder)[::7]
    table = tmp_path / "images.parquet"
    pq.write_table(pa.table({"path": paths, "content": [Path(p).read_bytes() for p in paths]}), table)
    out = tmp_path / "out.jsonl"
    summary = run(str(table), str(out), batch_size=8, partitions=3, settings=settings, spark=spark)
    rows = read_out(out)
    assert [r["path"] for r in rows] == paths and summary.written == len(paths)
    assert not (tmp_path / "out.jsonl.parts").exists()
    assert_same_as_served(rows, served)


def test_cli_killed_half_way_then_resumed_writes_each_row_once(env, folder, tmp_path):
    out = tmp_path / "out.parquet"
    argv = [CLI, "batch", str(folder), "--out", str(out), "--master", "local[1]", "--batch-size", "8",
            "--partitions", "25"]
    cli_env = {**os.environ, **env}
    first = subprocess.Popen(argv, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 3 or first.poll() is not None, 300,
                 "three finished partitions")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the whole job: driver JVM and Python workers
        first.wait()
    killed_with = len(list(out.glob("part-*.parquet")))
    assert 3 <= killed_with < 25, first.stdout.read().decode(errors="replace")[-3000:]

    second = subprocess.run(argv, env=cli_env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = read_out(out)
    assert sorted(r["path"] for r in rows) == sorted(image_files(folder))  # each row exactly once
    assert [r["path"] for r in rows] == image_files(folder)  # and in order across both runs
    done_first = 200 - int(second.stderr.split(" rows written")[0].rsplit(" ", 1)[-1])
    assert done_first > 0 and f"{done_first} already in" in second.stderr
    assert "part-" in second.stderr  # a line per finished partition
    # Each task's model runs on spark.task.cpus threads (default 1), not on every core.
    assert re.search(r"Python worker \d+ loaded digits\.keras \(openvino, fp32, 1 inference thread, 1 decode thread\)",
                     second.stderr)


def test_a_task_given_two_cores_runs_its_model_and_decoders_on_two_threads(env, folder, tmp_path):
    files = [p for p in image_files(folder) if "shard0" in p][:6]
    listing = tmp_path / "few"
    listing.mkdir()
    for p in files:
        (listing / Path(p).name).write_bytes(Path(p).read_bytes())
    out = tmp_path / "out.jsonl"
    argv = [CLI, "batch", str(listing), "--out", str(out), "--master", "local[2]", "--conf", "spark.task.cpus=2",
            "--conf", "spark.ui.enabled=false"]
    done = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = r"loaded digits\.keras \(openvino, fp32, 2 inference threads, 2 decode threads\)"
    assert re.search(line, done.stderr), done.stderr[-3000:]
    assert len(read_out(out)) == 6


def test_column_functions_inside_a_users_own_pipeline(spark, settings, folder, served, digits_model):
    from pyspark.sql import functions as F

    from inferstack_offline.spark import classify_column, embedding_column

    files = spark.read.format("binaryFile").option("pathGlobFilter", "*.png").option("recursiveFileLookup", "true") \
        .load(str(folder))
    classify = classify_column(top_k=3, batch_size=8, settings=settings)
    embed = embedding_column(batch_size=8, settings=settings)
    result = (files.where(F.col("length") < 1_000_000)
              .withColumn("r", classify("content")).withColumn("e", embed(F.col("content")))
              .select(F.regexp_replace("path", "^file:", "").alias("path"), "r.predictions", "r.error",
                      F.col("e.embedding").alias("embedding"), F.col("e.error").alias("embed_error"))
              .orderBy("path"))
    rows = [r.asDict(recursive=True) for r in result.collect()]
    pngs = sorted(p for p in served if p.endswith(".png"))
    assert [r["path"] for r in rows] == pngs
    for row in rows:
        answer = served[row["path"]]
        if isinstance(answer, tuple):
            assert row["error"] == answer[1] == row["embed_error"] and row["embedding"] is None
        else:
            assert [p["label"] for p in row["predictions"]] == [p["label"] for p in answer[:3]]
            assert row["error"] is None and len(row["embedding"]) == 7 * 7 * 16  # the Flatten before Dense
    # The embedding is the digits model's features before its classifier head.
    good = next(r for r in rows if r["error"] is None and "shard" in r["path"])
    expected = features_in_keras(digits_model, Path(good["path"]).read_bytes())
    np.testing.assert_allclose(good["embedding"], expected, rtol=1e-4, atol=1e-4)


def features_in_keras(digits_model: dict, upload: bytes) -> np.ndarray:
    import keras

    from inferstack.imaging import decode_image

    model = keras.saving.load_model(digits_model["path"], compile=False)
    head_input = keras.Model(model.inputs, model.layers[-1].input)
    x = decode_image(upload, (32, 32)).astype(np.float32)[None]
    return np.asarray(head_input(x, training=False))[0]


@pytest.mark.parametrize("rows, parallelism, expected", [
    (640, 2, 4),        # 2 waves of 2 partitions of 160 rows (5 batches), not 3 partitions of 214
    (10_000_000, 16, 39_072),  # 8 batches (256 rows) a partition, whole waves of 16
    (100, 2, 2),        # fewer rows than a partition's worth: still one partition per core
    (1, 8, 1),          # never more partitions than rows
])
def test_default_partitions_fill_every_core_in_whole_waves(rows: int, parallelism: int, expected: int) -> None:
    from inferstack_offline.batch import default_partitions

    n = default_partitions(rows, 32, parallelism)
    assert n == expected
    assert n <= rows and (n % parallelism == 0 or n == rows)
