"""Column functions for PySpark jobs: the served model over a column of images.

    from pyspark.sql import functions as F
    from inferstack_offline.spark import classify_column, embedding_column

    classify = classify_column(top_k=5)          # model from INFERSTACK_* on the driver
    df = spark.read.format("binaryFile").load("s3a://bucket/photos/")
    out = df.select("path", classify("content").alias("r")).select("path", "r.predictions", "r.error")

The column may hold the encoded files (binary) or paths (string) that the executors can read.
Each is a `pyspark.ml.functions.predict_batch_udf`: the model is loaded once per Python worker
(the worker's own loading code, so the runtime, precision and answers are the served ones) and
called on batches of `batch_size` rows. Bad rows come back with `error` set, never a failed task.
Keep `spark.sql.execution.arrow.maxRecordsPerBatch` small (see `session()`): it bounds how many
encoded images a Python worker holds at once.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

import numpy as np
from pyspark.ml.functions import predict_batch_udf
from pyspark.sql import Column, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

from inferstack.config import Settings

from .batch_model import Row, shared_model

PREDICTIONS = ArrayType(StructType([StructField("label", StringType()), StructField("probability", FloatType())]))
EMBEDDING = ArrayType(FloatType())
# predict_batch_udf's row results: a scalar field may not be None, so "" stands for "no error".
_CLASSIFY_RAW = StructType([StructField("predictions", PREDICTIONS), StructField("error", StringType())])
_EMBED_RAW = StructType([StructField("embedding", EMBEDDING), StructField("error", StringType())])
# Rows per Arrow batch handed to a Python worker: a few model batches' worth of encoded files.
MODEL_BATCHES_PER_ARROW_BATCH = 2
# Spark's statement of how many cores one task may use (default 1).
TASK_CPUS = "spark.task.cpus"


def with_task_threads(settings: Settings, spark: SparkSession | None = None) -> Settings:
    """settings whose model runs on spark.task.cpus threads, unless INFERSTACK_INFERENCE_THREADS says.

    Each task's Python worker holds its own model: on the runtime's default (every core) an
    executor running N tasks runs N models on every core each, N x N threads. (A capped OpenVINO
    model is not pinned to cores, so N one-thread models spread over N cores: docs/batch.md.)
    `spark`: else the active session; without one the runtime's default stays."""
    if settings.inference_threads > 0:
        return settings
    spark = spark or SparkSession.getActiveSession()
    if spark is None:
        return settings
    cpus = int(spark.sparkContext.getConf().get(TASK_CPUS, "1"))
    return dataclasses.replace(settings, inference_threads=cpus)


def _make_predict(settings: Settings, top_k: int, features: bool,
                  decode_threads: int | None) -> Callable[[], Callable[[np.ndarray], list[dict[str, Any]]]]:
    def make_predict_fn() -> Callable[[np.ndarray], list[dict[str, Any]]]:
        # Runs once per Python worker (predict_batch_udf caches it): the model load happens here.
        model = shared_model(settings, features, decode_threads)

        def predict(items: np.ndarray) -> list[dict[str, Any]]:
            return [_raw(row, features) for row in model.run(list(items), top_k)]

        return predict

    return make_predict_fn


def _raw(row: Row, features: bool) -> dict[str, Any]:
    if features:
        vector = row.embedding if row.embedding is not None else np.zeros(0, np.float32)
        return {"embedding": np.asarray(vector, np.float32), "error": row.error or ""}
    return {"predictions": np.array(row.predictions or [], dtype=object), "error": row.error or ""}


def _column_fn(raw_udf: Callable[..., Column], value: str) -> Callable[[Column | str], Column]:
    def apply(column: Column | str) -> Column:
        raw = raw_udf(column)
        error = F.nullif(raw["error"], F.lit(""))
        return F.struct(F.when(error.isNull(), raw[value]).alias(value), error.alias("error"))

    return apply


def classify_column(
    top_k: int = 5,
    batch_size: int | None = None,
    settings: Settings | None = None,
    decode_threads: int | None = None,
) -> Callable[[Column | str], Column]:
    """A column function: images (binary files or readable paths) -> struct<predictions, error>.

    predictions: list of {label, probability}, top_k, most probable first (null on error);
    error: null, or the sentence `/predict` would answer for that file. The model is the one
    INFERSTACK_* names where this is called (the driver), or `settings`.
    """
    if not 1 <= top_k <= 1000:
        raise ValueError(f"top_k must be between 1 and 1000, got {top_k}")
    settings = with_task_threads(settings or Settings.from_env())
    raw = predict_batch_udf(_make_predict(settings, top_k, False, decode_threads), return_type=_CLASSIFY_RAW,
                            batch_size=batch_size or settings.batch_size)
    return _column_fn(raw, "predictions")


def embedding_column(
    batch_size: int | None = None,
    settings: Settings | None = None,
    decode_threads: int | None = None,
) -> Callable[[Column | str], Column]:
    """A column function: images -> struct<embedding (array<float>, null on error), error>.

    The embedding is the model's pooled features, the input of its classifier head (for ResNet50
    the 2048 averaged channels), computed on the same runtime and precision as the served model.
    """
    settings = with_task_threads(settings or Settings.from_env())
    raw = predict_batch_udf(_make_predict(settings, 1, True, decode_threads), return_type=_EMBED_RAW,
                            batch_size=batch_size or settings.batch_size)
    return _column_fn(raw, "embedding")


def session(master: str | None = None, batch_size: int = 32, app_name: str = "inferstack-batch",
            conf: dict[str, str] | None = None) -> SparkSession:
    """A SparkSession set up for these column functions (Python workers run this interpreter,
    Arrow batches of a few model batches, reused Python workers that keep their model)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    settings = {
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(batch_size * MODEL_BATCHES_PER_ARROW_BATCH),
        "spark.python.worker.reuse": "true",
        "spark.sql.execution.pyspark.udf.faulthandler.enabled": "true",
        **(conf or {}),
    }
    for key, value in settings.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()
