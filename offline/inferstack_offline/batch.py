"""`inferstack batch INPUT --out OUT`: the served model over a whole data set, on Spark.

INPUT: a folder or glob of image files, or a Parquet / JSON Lines table with a `path` column or
a binary `content` column. OUT: Parquet (a folder of parts) or JSON Lines (`.jsonl`) with one row
per input, in input order: `path`, `predictions` (list of {label, probability}), `error` (null
when fine). Each finished partition is written whole, so a re-run skips what is already in OUT.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from inferstack.config import ConfigError, Settings

from .batch_io import ROW_KEY_PREFIX, InputError, Output, is_table, list_images, result_schema, write_part
from .batch_model import shared_model

# Rows per partition by default: a few model batches, so progress and resumption are fine-grained.
BATCHES_PER_PARTITION = 8
SUMMARY_SCHEMA = "part string, rows long, errors long"


@dataclass
class Summary:
    written: int = 0
    errors: int = 0
    skipped: int = 0  # already in OUT
    parts: int = 0


def default_partitions(rows: int, batch_size: int, parallelism: int) -> int:
    """About BATCHES_PER_PARTITION batches a partition, in whole waves of `parallelism` tasks: 640
    rows on 2 cores are 4 partitions of 160, not 3 of 214 (whose last would run on one core alone).
    A partition's first batch decodes before any inference can start, so fewer, fuller partitions
    hide more of the decoding (one batch per partition hides none)."""
    parallelism = max(1, parallelism)
    waves = max(1, math.ceil(rows / (parallelism * batch_size * BATCHES_PER_PARTITION)))
    return max(1, min(rows, parallelism * waves))


def _file_rows(spark: Any, spec: str, done: set[str], partitions: int | None, batch_size: int) -> tuple[Any, int]:
    """(idx, path, item) for image files not yet done; item is the absolute path executors read."""
    paths = list_images(spec)
    todo = [(i, p, os.path.abspath(p)) for i, p in enumerate(paths) if p not in done]
    n = partitions or default_partitions(len(todo), batch_size, spark.sparkContext.defaultParallelism)
    # parallelize slices the list in order: partition k holds a contiguous run of rows.
    rdd = spark.sparkContext.parallelize(todo, max(1, min(n, len(todo))))
    return spark.createDataFrame(rdd, "idx long, path string, item string"), len(paths) - len(todo)


def _table_rows(spark: Any, spec: str, done: set[str], partitions: int | None, batch_size: int) -> tuple[Any, int]:
    """(idx, path, item) for a table's rows not yet done; idx is the row's position in the table."""
    from pyspark.sql import functions as F

    lower = spec.lower().rstrip("/")
    df = spark.read.json(spec) if lower.endswith((".jsonl", ".json")) else spark.read.parquet(spec)
    types = dict(df.dtypes)
    if types.get("content") == "binary":
        item = F.col("content")
    elif types.get("content") == "string":
        item = F.unbase64("content")  # JSON Lines carry bytes as base64
    elif types.get("path") == "string":
        item = F.col("path")
    else:
        raise InputError(f"table {spec!r} has no binary `content` or string `path` column (columns: {df.columns})")
    idx = _row_positions(df)
    key = F.col("path") if types.get("path") == "string" else F.concat(F.lit(ROW_KEY_PREFIX), idx.cast("string"))
    rows = df.select(idx.alias("idx"), key.alias("path"), item.alias("item"))
    total = rows.count()
    if done:
        rows = rows.join(spark.createDataFrame([(k,) for k in done], "path string"), "path", "left_anti")
    n = partitions or default_partitions(total - len(done), batch_size, spark.sparkContext.defaultParallelism)
    return rows.repartitionByRange(max(1, n), "idx").sortWithinPartitions("idx"), len(done)


def _row_positions(df: Any) -> Any:
    """Each row's position in the table (0, 1, 2, ...), from per-partition counts: no shuffle."""
    from pyspark.sql import functions as F

    counts = dict(df.groupBy(F.spark_partition_id().alias("p")).count().collect())
    offsets, total = [], 0
    for p in range(max(counts, default=-1) + 1):
        offsets.append(total)
        total += counts.get(p, 0)
    partition = F.spark_partition_id()
    offset = F.element_at(F.array(*[F.lit(o).cast("long") for o in offsets or [0]]), partition + 1)
    # monotonically_increasing_id is (partition << 33) + position within the partition.
    return offset + F.monotonically_increasing_id() - F.shiftleft(partition.cast("long"), 33)


def _chunks(batches: Iterator[Any], size: int, keys: list[str], first: list[int]) -> Iterator[list[Any]]:
    """The partition's items in model batches; their keys and first row index collected on the way."""
    for batch in batches:
        columns = batch.to_pydict()
        if not first and columns["idx"]:
            first.append(columns["idx"][0])
        keys += columns["path"]
        items = columns["item"]
        for i in range(0, len(items), size):
            yield items[i:i + size]


def part_job(folder: str, run_id: str, settings: Settings, batch_size: int, top_k: int,
             decode_threads: int | None) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """mapInArrow function: classify the partition's rows (decoding the next model batch while
    this one runs), write them as one part file, yield its summary. One Python stage per task,
    so a reused Python worker always holds the model (shared_model)."""

    def job(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        model = shared_model(settings, False, decode_threads)
        keys: list[str] = []
        first: list[int] = []
        rows = [row for chunk in model.run_many(_chunks(batches, batch_size, keys, first), top_k) for row in chunk]
        if not rows:
            return
        table = pa.table({"path": keys, "predictions": [r.predictions for r in rows],
                          "error": [r.error for r in rows]}, schema=result_schema())
        name, written, errors = write_part(folder, first[0], run_id, table.to_batches())
        print(f"inferstack batch: {name}: {written} rows, {errors} errors", file=sys.stderr, flush=True)
        yield pa.RecordBatch.from_pydict({"part": [name], "rows": [written], "errors": [errors]})

    return job


def run(
    spec: str,
    out: str,
    master: str | None = None,
    batch_size: int | None = None,
    partitions: int | None = None,
    top_k: int = 5,
    settings: Settings | None = None,
    decode_threads: int | None = None,
    spark: Any = None,
    conf: dict[str, str] | None = None,
) -> Summary:
    """Classify every image of INPUT into OUT, skipping rows already there.

    conf: Spark settings for the session this starts (not for a given `spark`). Each task's model
    and decoders run on spark.task.cpus threads unless INFERSTACK_INFERENCE_THREADS is set."""
    from .spark import session, with_task_threads

    settings = settings or Settings.from_env()
    batch_size = batch_size or settings.batch_size
    output = Output(Path(out))
    output.prepare()
    done = output.done_keys()
    spark = spark or session(master, batch_size, conf=conf)
    settings = with_task_threads(settings, spark)
    rows, skipped = (_table_rows if is_table(spec) else _file_rows)(spark, spec, done, partitions, batch_size)
    job = part_job(str(output.parts), uuid.uuid4().hex[:8], settings, batch_size, top_k, decode_threads)
    summary = Summary(skipped=skipped)
    for part, written, errors in rows.mapInArrow(job, SUMMARY_SCHEMA).collect():
        summary.parts += 1
        summary.written += written
        summary.errors += errors
    output.finish()
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inferstack batch", description=__doc__.split("\n\n")[0])
    p.add_argument("input", metavar="INPUT", help="folder or glob of images, or a Parquet / JSON Lines table")
    p.add_argument("--out", required=True, help="Parquet folder, or a .jsonl file; a re-run skips rows in it")
    p.add_argument("--master", default=os.environ.get("SPARK_MASTER"),
                   help="local[*], spark://host:7077, k8s://https://... (default: $SPARK_MASTER, else local[*])")
    p.add_argument("--batch-size", type=int, help="images per model call (default: $INFERSTACK_BATCH_SIZE or 32)")
    p.add_argument("--partitions", type=int, help=f"Spark partitions (default: {BATCHES_PER_PARTITION} batches each)")
    p.add_argument("--top-k", type=int, default=5, help="predictions per image (1..1000, default 5)")
    p.add_argument("--decode-threads", type=int,
                   help="decoding threads per Python worker (default: spark.task.cpus, or INFERSTACK_INFERENCE_THREADS)")
    p.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                   help="a Spark setting, e.g. spark.task.cpus=2 (cores, hence model threads, per task); repeatable")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.top_k <= 1000:
        parser.error("--top-k must be between 1 and 1000")
    for name in ("batch_size", "partitions", "decode_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any("=" not in item for item in args.conf):
        parser.error("--conf takes KEY=VALUE")
    conf = dict(item.split("=", 1) for item in args.conf)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.monotonic()
    try:
        # No --master: spark-submit's (k8s://... in a SparkApplication), else PySpark's local[*].
        summary = run(args.input, args.out, args.master, args.batch_size, args.partitions,
                      args.top_k, decode_threads=args.decode_threads, conf=conf)
    except (ConfigError, InputError) as exc:
        sys.exit(f"inferstack batch: {exc}")
    except KeyboardInterrupt:
        sys.exit("inferstack batch: interrupted; re-run the same command to resume")
    elapsed = time.monotonic() - t0
    rate = summary.written / elapsed if elapsed > 0 else 0.0
    print(f"inferstack batch: {summary.written} rows written ({summary.errors} with an error) in {summary.parts} "
          f"part(s), {summary.skipped} already in {args.out}; {elapsed:.1f} s ({rate:.1f} images/s)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
