"""One local Spark session for the offline tests (starting a JVM costs seconds)."""

from __future__ import annotations

from typing import Iterator

import pytest


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    from inferstack_offline.spark import session

    spark = session("local[2]", batch_size=16, app_name="inferstack-tests",
                    conf={"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4"})
    spark.sparkContext.setLogLevel("ERROR")
    yield spark
    spark.stop()
