"""Runtimes and precisions: which combinations exist, the refusals, the caches, and the accuracy
guard over HTTP (each runtime/precision within 0.5 points of Keras fp32 on the digits test set)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis
import requests

from inferstack.config import ConfigError, Settings
from tools.devstack import LocalStack
from inferstack_worker import keras_runtime, openvino_runtime
from inferstack_worker.model import Classifier, load_classifier, load_keras_model
from inferstack_worker.runtime import Plan, bucket_sizes, gpu_available, resolve
from tests.helpers import DIGIT_LABELS, digit_images, digits_env, png_bytes, stack_log, wait_for


def digits_settings(model: dict, **kw: object) -> Settings:
    return Settings(model=str(model["path"]), labels=str(model["labels"]), **kw)


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory) -> str:
    """300 training digits (none of the held-out test images) as PNG files, as a user would provide."""
    folder = tmp_path_factory.mktemp("calibration")
    images, _ = digit_images()
    for i, img in enumerate(images[:300]):
        (folder / f"digit-{i:03d}.png").write_bytes(png_bytes(img))
    (folder / "README.txt").write_text("not an image: ignored")
    return str(folder)


def test_runtime_and_precision_settings_are_validated():
    s = Settings.from_env({})
    assert (s.runtime, s.precision, s.calibration_dir, s.cache_dir) == ("auto", "auto", None, None)
    s = Settings.from_env({"INFERSTACK_RUNTIME": "OpenVINO", "INFERSTACK_PRECISION": "int8",
                           "INFERSTACK_CALIBRATION_DIR": "/cal", "INFERSTACK_CACHE_DIR": "/cache"})
    assert (s.runtime, s.precision, s.calibration_dir, s.cache_dir) == ("openvino", "int8", "/cal", "/cache")
    with pytest.raises(ConfigError, match="INFERSTACK_RUNTIME must be one of auto, keras, openvino, got 'tensorrt'"):
        Settings.from_env({"INFERSTACK_RUNTIME": "tensorrt"})
    with pytest.raises(ConfigError, match="INFERSTACK_PRECISION must be one of .*got 'fp8'"):
        Settings.from_env({"INFERSTACK_PRECISION": "fp8"})


def test_auto_picks_openvino_on_a_cpu_measuring_its_precision_and_keras_fp32_when_asked():
    # The worker extra installs openvino; CI has no GPU (where one is visible, auto means Keras + XLA,
    # its precision measured too). The measurement itself: tests/worker/test_precision_auto.py.
    gpu = gpu_available()
    auto = Plan("keras", "auto", gpu=True) if gpu else Plan("openvino", "auto", gpu=False)
    assert resolve(Settings()) == auto
    assert resolve(Settings(runtime="keras")) == Plan("keras", "auto" if gpu else "fp32", gpu=gpu)
    assert not resolve(Settings(runtime="keras", precision="bf16")).xla


@pytest.mark.parametrize("kw, message", [
    ({"runtime": "keras", "precision": "int8"}, "int8 needs INFERSTACK_RUNTIME=openvino"),
    ({"runtime": "openvino", "precision": "int8"}, "int8 needs calibration images: set INFERSTACK_CALIBRATION_DIR"),
    ({"precision": "int8", "calibration_dir": "/nonexistent"}, "is not a folder"),
    ({"runtime": "keras", "precision": "fp16"}, "fp16 with Keras needs a GPU"),
])
def test_impossible_combinations_are_refused_with_a_clear_message(kw, message):
    with pytest.raises(ConfigError, match=message):
        resolve(Settings(**kw))


def test_int8_refuses_a_calibration_folder_without_images(digits_model, tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ConfigError, match="holds no readable images"):
        load_classifier(digits_settings(digits_model, runtime="openvino", precision="int8",
                                        calibration_dir=str(tmp_path)))


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert bucket_sizes(48) == [1, 2, 4, 8, 16, 32, 48]


def test_gpu_path_mixed_precision_with_xla_runs_here_on_cpu(digits_model):
    """What a GPU node runs (bf16 layers, XLA, padded fixed batch shapes), exercised on this CPU."""
    model, _ = load_keras_model(digits_settings(digits_model))
    x = digits_model["x_test"][:37].astype(np.float32)
    reference = np.asarray(model(x, training=False))
    mixed = keras_runtime.with_precision(model, "bf16")
    assert mixed.layers[0].dtype_policy.name == "mixed_bfloat16"
    assert mixed.layers[-1].dtype_policy.name == "float32"  # probabilities keep full resolution
    call, pad = keras_runtime.compile_call(mixed, None, (32, 32, 3), xla=True)
    assert pad
    clf = Classifier("digits", DIGIT_LABELS, (32, 32, 3), call, buckets=bucket_sizes(16), precision="bf16")
    clf.warm_up(16)
    # Odd sizes are padded to a compiled bucket and cut back; larger ones run as they are.
    out = np.concatenate([clf.predict(x[:5]), clf.predict(x[5:16]), clf.predict(x[16:17]), clf.predict(x[17:])])
    assert out.shape == (37, 10) and out.dtype == np.float32
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-3)
    assert np.abs(out - reference).max() < 0.05  # bf16 has 8 bits of mantissa
    assert np.abs(out - reference).max() > 0  # and really computed in bf16
    assert np.mean(out.argmax(1) == reference.argmax(1)) >= 0.97


def test_mixed_precision_reaches_the_layers_of_a_nested_backbone():
    """Transfer models nest a backbone model; its layers must compute in bf16/fp16 too."""
    import keras

    keras.utils.set_random_seed(0)
    backbone = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                                 keras.layers.Flatten()], name="backbone")
    model = keras.Sequential([keras.Input((8, 8, 3)), backbone, keras.layers.Dense(3, activation="softmax")])
    mixed = keras_runtime.with_precision(model, "fp16")
    assert [layer.dtype_policy.name for layer in mixed.layers[0].layers] == ["mixed_float16"] * 2
    assert mixed.layers[-1].dtype_policy.name == "float32"
    x = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 3)).astype(np.float32)
    assert np.abs(np.asarray(mixed(x)) - np.asarray(model(x))).max() < 1e-2


def test_openvino_matches_keras_and_caches_the_converted_model(digits_model, tmp_path, monkeypatch):
    settings = digits_settings(digits_model, runtime="openvino", precision="fp32", cache_dir=str(tmp_path))
    x = digits_model["x_test"][:20].astype(np.float32)
    model, _ = load_keras_model(settings)
    first = load_classifier(settings)
    info = {k: v for k, v in first.info().items() if k != "labels"}
    assert info == {"name": "digits.keras", "input_shape": [32, 32, 3], "classes": 10,
                    "runtime": "openvino", "precision": "fp32", "precision_choice": {}}
    assert first.info()["labels"] == first.labels
    out = first.predict(x)
    assert np.abs(out - np.asarray(model(x, training=False))).max() < 1e-5
    assert first.predict(x[:3]).shape == (3, 10)  # dynamic batch dimension
    assert list((tmp_path / "openvino").glob("*.xml")) and any((tmp_path / "openvino" / "compiled").iterdir())

    # A restart with the same model reads the cached conversion: neither Keras loading nor conversion runs.
    def not_again(*_a: object, **_k: object) -> None:
        raise AssertionError("the cached model should have been used")

    monkeypatch.setattr(openvino_runtime, "convert", not_again)
    monkeypatch.setattr("inferstack_worker.model.load_keras_model", not_again)
    second = load_classifier(settings)
    assert np.array_equal(second.predict(x), out)
    # The key follows the file's content: a retrained model written over the same path is converted anew.
    key = openvino_runtime.cache_key(settings, "fp32", is_file=True)
    assert openvino_runtime.cache_key(settings, "int8", is_file=True) != key
    assert openvino_runtime.cache_key(replace(settings, precision="bf16"), "bf16", is_file=True) == key
    retrained = tmp_path / "retrained.keras"
    retrained.write_bytes(Path(settings.model).read_bytes())
    before = openvino_runtime.cache_key(replace(settings, model=str(retrained)), "fp32", is_file=True)
    retrained.write_bytes(retrained.read_bytes() + b"\0")
    assert openvino_runtime.cache_key(replace(settings, model=str(retrained)), "fp32", is_file=True) != before


# A second worker (another Spark task, say) loading the same model into the same cache.
SECOND_WORKER = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from inferstack.config import Settings
from inferstack_worker.model import load_classifier
clf = load_classifier(Settings(model=sys.argv[1], labels=sys.argv[2], runtime="openvino", precision="fp32",
                               cache_dir=sys.argv[3], inference_threads=1))
print("loaded", clf.precision)
"""


def test_processes_sharing_a_cache_compile_one_at_a_time(digits_model, tmp_path):
    """OpenVINO's blob cache breaks when two processes write the same blob at once: a worker that
    finds another compiling into its cache says so and waits, then loads."""
    folder = openvino_runtime.compiled_dir(str(tmp_path))
    folder.mkdir(parents=True)
    log = tmp_path / "second.log"
    with open(folder / ".lock", "a") as held, open(log, "w") as out:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a first process compiling would hold it
        proc = subprocess.Popen([sys.executable, "-c", SECOND_WORKER, str(digits_model["path"]),
                                 str(digits_model["labels"]), str(tmp_path)], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "waiting for another process compiling into" in log.read_text(), timeout=120,
                     what="the waiting line", explain=log.read_text)
            assert proc.poll() is None  # still waiting while the lock is held
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
    assert proc.wait(timeout=120) == 0, log.read_text()
    assert "loaded fp32" in log.read_text() and any(folder.glob("*.blob"))


def test_random_weights_are_never_cached(tmp_path):
    s = Settings(model="ResNet50", weights="none", runtime="openvino", cache_dir=str(tmp_path))
    assert openvino_runtime.cache_key(s, "fp32", is_file=False) is None
    assert openvino_runtime.cache_key(Settings(model="ResNet50", cache_dir=str(tmp_path)), "fp32", False)


# The accuracy guard: every combination this CPU can run, served over HTTP.
COMBINATIONS = [("keras", "fp32"), ("keras", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"),
                ("openvino", "int8")]


@pytest.fixture(scope="module")
def served_classes(digits_model, calibration_dir, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Top-1 class of every held-out digit, served over HTTP by each runtime/precision in turn."""
    uploads = [png_bytes(img) for img in digits_model["x_test"]]
    results: dict[tuple[str, str], dict] = {}
    for runtime, precision in COMBINATIONS:
        env = digits_env(digits_model, INFERSTACK_RUNTIME=runtime, INFERSTACK_PRECISION=precision,
                         INFERSTACK_CALIBRATION_DIR=calibration_dir, INFERSTACK_BATCH_SIZE="16")
        with LocalStack(env=env, log_dir=str(tmp_path_factory.mktemp(f"{runtime}-{precision}"))) as stack:
            stack.start(workers=1)

            def served_class(upload: bytes) -> int:
                r = requests.post(stack.url + "/predict", files={"image": ("d.png", upload)},
                                  params={"top_k": 1}, timeout=60)
                assert r.status_code == 200, r.text + stack_log(stack)
                return DIGIT_LABELS.index(r.json()["predictions"][0]["label"])

            with ThreadPoolExecutor(8) as pool:
                classes = np.array(list(pool.map(served_class, uploads)))
            raw = redis.Redis.from_url(stack.env["INFERSTACK_REDIS_URL"]).get("inferstack:model")
            results[(runtime, precision)] = {"classes": classes, "info": json.loads(raw)}
    y = digits_model["y_test"]
    base = results[("keras", "fp32")]["classes"]
    print("\nruntime   precision  runs   accuracy  top-1 agreement with keras fp32")
    for (runtime, precision), r in results.items():
        r["accuracy"] = float(np.mean(r["classes"] == y))
        r["agreement"] = float(np.mean(r["classes"] == base))
        print(f"{runtime:9} {precision:9} {r['info']['precision']:5} {100 * r['accuracy']:8.2f}% "
              f"{100 * r['agreement']:8.2f}%")
    return results


@pytest.mark.parametrize("runtime, precision", COMBINATIONS[1:])
def test_accuracy_over_http_within_half_a_point_of_keras_fp32(served_classes, runtime, precision):
    base = served_classes[("keras", "fp32")]
    r = served_classes[(runtime, precision)]
    assert base["accuracy"] > 0.85, "the test model should have learnt the digits"
    assert r["info"]["runtime"] == runtime  # the combination asked for is the one that served
    assert abs(r["accuracy"] - base["accuracy"]) <= 0.005
    if precision == "bf16":
        assert r["agreement"] >= 0.99


def test_worker_refuses_int8_without_calibration_images_and_says_why(digits_model):
    env = {**os.environ, **digits_env(digits_model), "INFERSTACK_RUNTIME": "openvino", "INFERSTACK_PRECISION": "int8",
           "INFERSTACK_REDIS_URL": "redis://127.0.0.1:9/0"}
    env.pop("INFERSTACK_CALIBRATION_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "inferstack_worker.cli"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "INFERSTACK_PRECISION=int8 needs calibration images: set INFERSTACK_CALIBRATION_DIR" in proc.stderr
