"""The Kubernetes recipes for `inferstack batch` agree with the image and the CLI they drive
(neither a Spark Operator nor Docker runs here: the manifest and the docs are checked statically)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from inferstack_offline.batch import build_parser

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "operator/examples/spark/sparkapplication.yaml"
DOCKERFILE = REPO / "images/worker/Dockerfile.spark"
DOCS = REPO / "docs/batch.md"


def image_python() -> str:
    default = re.search(r"ARG PYTHON_IMAGE=python:(\d+\.\d+)\.", DOCKERFILE.read_text())
    assert default, "Dockerfile.spark pins its Python base image"
    return default.group(1)


def main_file_in_image(uri: str) -> Path:
    """local:///opt/venv/lib/pythonX.Y/site-packages/<pkg>/<file> -> the file in this checkout."""
    match = re.fullmatch(r"local:///opt/venv/lib/python(\d+\.\d+)/site-packages/inferstack_offline/(\w+\.py)", uri)
    assert match, uri
    assert match.group(1) == image_python(), "the path names the image's Python version"
    return REPO / "offline/inferstack_offline" / match.group(2)


def test_spark_application_runs_the_batch_cli_from_the_spark_image():
    app = yaml.safe_load(APP.read_text())
    assert (app["apiVersion"], app["kind"]) == ("sparkoperator.k8s.io/v1beta2", "SparkApplication")
    spec = app["spec"]
    assert spec["type"] == "Python" and spec["mode"] == "cluster"
    assert main_file_in_image(spec["mainApplicationFile"]).is_file()
    args = build_parser().parse_args(spec["arguments"])
    assert args.out.endswith(".parquet") and args.master is None  # the operator's master, not local
    chart = yaml.safe_load((REPO / "charts/inferstack/Chart.yaml").read_text())
    assert spec["image"] == f"ghcr.io/inferstack/worker-spark:{chart['appVersion']}"
    uid = re.search(r"useradd .*--uid (\d+)", DOCKERFILE.read_text()).group(1)
    for role in ("driver", "executor"):
        assert spec[role]["securityContext"]["runAsUser"] == int(uid)
        mounts = {m["name"]: m["mountPath"] for m in spec[role]["volumeMounts"]}
        assert args.input.startswith(mounts["data"] + "/") and args.out.startswith(mounts["data"] + "/")
    assert int(spec["sparkConf"]["spark.sql.execution.arrow.maxRecordsPerBatch"]) <= 4 * int(args.batch_size)


def test_documented_spark_submit_uses_the_same_entry_file_and_valid_cli_arguments():
    text = DOCS.read_text()
    main = re.search(r"^MAIN=(\S+)$", text, re.M).group(1)
    assert main == yaml.safe_load(APP.read_text())["spec"]["mainApplicationFile"]
    command = re.search(r"\$MAIN (.+)$", text, re.M).group(1)
    args = build_parser().parse_args(shlex.split(command))
    assert args.input == "/data/photos" and args.batch_size == 32
    assert "--master k8s://" in text and "--deploy-mode cluster" in text
