"""INFERSTACK_INFERENCE_THREADS: the threads one model runs on, as each runtime applies it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from inferstack.config import ConfigError, Settings
from inferstack_worker import cpu_quota
from inferstack_worker.model import load_classifier
from tests.worker.test_runtimes import digits_settings


def test_the_setting_is_parsed_and_bounded():
    assert Settings.from_env({}).inference_threads == 0  # the runtime's default
    assert Settings.from_env({"INFERSTACK_INFERENCE_THREADS": "3"}).inference_threads == 3
    with pytest.raises(ConfigError, match="INFERSTACK_INFERENCE_THREADS must be between 0 and 1024, got -1"):
        Settings.from_env({"INFERSTACK_INFERENCE_THREADS": "-1"})
    with pytest.raises(ConfigError, match="INFERSTACK_INFERENCE_THREADS must be an integer, got 'all'"):
        Settings.from_env({"INFERSTACK_INFERENCE_THREADS": "all"})


def test_openvino_compiles_the_model_on_the_threads_asked_for(digits_model):
    x = digits_model["x_test"][:4].astype(np.float32)
    default = load_classifier(digits_settings(digits_model, runtime="openvino", precision="fp32"))
    capped = load_classifier(digits_settings(digits_model, runtime="openvino", precision="fp32", inference_threads=1))
    compiled = capped._call.compiled  # what the CPU plugin was told, read back from the compiled model
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1 and capped.threads == 1
    # Not pinned: models capped to one thread each in several processes would share one core.
    assert compiled.get_property("ENABLE_CPU_PINNING") is False
    # Unset, the latency hint keeps every core it sees (more than one wherever there are several).
    assert default.threads == default._call.compiled.get_property("INFERENCE_NUM_THREADS")
    assert default.threads > 1 or os.cpu_count() == 1
    np.testing.assert_allclose(capped.predict(x), default.predict(x), rtol=0, atol=1e-5)


# TensorFlow fixes its thread pools when it starts: a fresh interpreter, as a worker process is.
KERAS_PROBE = """
import json, sys
import tensorflow as tf
from inferstack.config import Settings
from inferstack_worker import cpu_quota
from inferstack_worker.model import load_classifier
import numpy as np
settings = Settings(model=sys.argv[1], labels=sys.argv[2], runtime="keras", precision="fp32",
                    inference_threads=int(sys.argv[3]))
clf = load_classifier(settings)
clf.predict(np.zeros((2, *clf.input_shape), np.float32))
print(json.dumps({"threads": clf.threads, "intra": tf.config.threading.get_intra_op_parallelism_threads(),
                  "inter": tf.config.threading.get_inter_op_parallelism_threads()}))
"""


def keras_threads(digits_model: dict, threads: int) -> dict[str, int]:
    proc = subprocess.run([sys.executable, "-c", KERAS_PROBE, str(digits_model["path"]), str(digits_model["labels"]),
                           str(threads)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_keras_runs_tensorflow_on_the_threads_asked_for(digits_model):
    assert keras_threads(digits_model, 1) == {"threads": 1, "intra": 1, "inter": 1}
    assert keras_threads(digits_model, 0) == {"threads": 0, "intra": 0, "inter": 0}


def cgroup(tmp_path, v2: str | None = None, v1: tuple[str, str] | None = None):
    """A cgroup folder as a container sees it: v2's cpu.max, or v1's cpu/cpu.cfs_quota_us and period."""
    root = tmp_path / "cgroup"
    (root / "cpu").mkdir(parents=True)
    if v2 is not None:
        (root / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (root / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (root / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return root


def test_the_cgroup_cpu_quota_is_read_as_whole_cpus(tmp_path):
    assert cpu_quota.quota_cpus(cgroup(tmp_path / "a", v2="400000 100000")) == 4
    assert cpu_quota.quota_cpus(cgroup(tmp_path / "b", v2="150000 100000")) == 2  # 1.5 CPUs: 2 threads
    assert cpu_quota.quota_cpus(cgroup(tmp_path / "c", v2="max 100000")) is None
    assert cpu_quota.quota_cpus(cgroup(tmp_path / "d", v1=("50000", "100000"))) == 1
    assert cpu_quota.quota_cpus(cgroup(tmp_path / "e", v1=("-1", "100000"))) is None
    assert cpu_quota.quota_cpus(cgroup(tmp_path / "f")) is None  # no CPU controller files at all


def test_a_worker_under_a_cpu_quota_runs_its_model_on_that_many_threads(digits_model, tmp_path, monkeypatch):
    """A pod limited to 1 CPU on a bigger node: the model gets 1 thread, not one per node core;
    an explicit INFERSTACK_INFERENCE_THREADS still wins."""
    monkeypatch.setattr(cpu_quota, "CGROUP_ROOT", cgroup(tmp_path, v2="100000 100000"))
    limited = load_classifier(digits_settings(digits_model, runtime="openvino", precision="fp32"))
    assert limited.threads == 1 == limited._call.compiled.get_property("INFERENCE_NUM_THREADS")
    explicit = load_classifier(digits_settings(digits_model, runtime="openvino", precision="fp32", inference_threads=2))
    assert explicit.threads == 2
