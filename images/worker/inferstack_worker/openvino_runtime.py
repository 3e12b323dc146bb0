"""The OpenVINO runtime on CPU: convert the Keras model once, optionally quantize it to int8 with
NNCF, cache both the converted model and the compiled blob on disk, infer with one request."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from inferstack.config import ConfigError, Settings
from inferstack.contract.media import IMAGE_SUFFIXES
from inferstack.imaging import BadImage, decode_image

log = logging.getLogger("inferstack.worker")

# OpenVINO's names for the inference precision hint; int8 models keep the CPU default for the rest.
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
CALIBRATION_IMAGES = 300  # NNCF's default subset size


def convert(model: Any, preprocess: Callable[[Any], Any] | None, input_shape: tuple[int, int, int]) -> Any:
    """Keras model (with its preprocess_input folded in) -> ov.Model with a dynamic batch dimension."""
    import openvino as ov
    import tensorflow as tf

    h, w, c = input_shape

    def forward(x: Any) -> Any:
        if preprocess is not None:
            x = preprocess(x)
        return model(x, training=False)

    fn = tf.function(forward, input_signature=[tf.TensorSpec([None, h, w, c], tf.float32)])
    # Copy the weights: shared ones point into TensorFlow buffers that are freed (and reused) once
    # the Keras model is garbage-collected, silently changing the served model.
    return ov.convert_model(fn, share_weights=False)


def calibration_images(folder: str, prepare: Callable[[np.ndarray], np.ndarray],
                       input_shape: tuple[int, int, int]) -> list[np.ndarray]:
    """Up to CALIBRATION_IMAGES images from the folder (recursively, sorted), prepared as served."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    out: list[np.ndarray] = []
    for path in files:
        if len(out) == CALIBRATION_IMAGES:
            break
        try:
            pixels = decode_image(path.read_bytes(), input_shape[:2])
        except (BadImage, OSError) as exc:
            log.warning("calibration: skipping %s (%s)", path, exc)
            continue
        out.append(prepare(pixels)[None])
    if not out:
        raise ConfigError(
            f"INFERSTACK_CALIBRATION_DIR={folder!r} holds no readable images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}); int8 quantization needs a few hundred representative ones"
        )
    if len(out) < 100:
        log.warning("calibration: only %d image(s) in %s; a few hundred give more accurate int8", len(out), folder)
    return out


def quantize(ov_model: Any, images: list[np.ndarray]) -> Any:
    import nncf

    log.info("quantizing to int8 with NNCF on %d calibration image(s)", len(images))
    return nncf.quantize(ov_model, nncf.Dataset(images), subset_size=len(images))


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(settings: Settings, precision: str, is_file: bool) -> str | None:
    """What the converted model depends on; None when it cannot be reused (random weights)."""
    if not settings.cache_dir:
        return None
    parts: dict[str, Any] = {"model": settings.model, "int8": precision == "int8"}
    if is_file:
        parts["model_sha256"] = _file_digest(settings.model)
    elif settings.weights.lower() == "none":
        return None
    elif os.path.exists(settings.weights):
        parts["weights_sha256"] = _file_digest(settings.weights)
    else:
        parts["weights"] = settings.weights
    if precision == "int8":
        root = Path(settings.calibration_dir or "")
        parts["calibration"] = sorted(
            (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()
        )
    for dist in ("openvino", "nncf", "keras", "tensorflow", "tensorflow-cpu"):
        try:
            parts[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def ir_path(cache_dir: str, key: str) -> Path:
    return Path(cache_dir) / "openvino" / f"{key}.xml"


def read_cached(cache_dir: str | None, key: str | None) -> Any | None:
    if not cache_dir or not key:
        return None
    path = ir_path(cache_dir, key)
    if not path.exists():
        return None
    import openvino as ov

    log.info("using the converted model cached at %s", path)
    return ov.Core().read_model(path)


def write_cached(ov_model: Any, cache_dir: str | None, key: str | None) -> None:
    if not cache_dir or not key:
        return
    try:
        save_ir(ov_model, ir_path(cache_dir, key))
    except OSError as exc:
        log.warning("cannot cache the converted model in %s: %s", cache_dir, exc)


# OPTIMIZATION_CAPABILITIES entries that make a float precision worth timing.
CAPABILITIES = {"bf16": "BF16", "fp16": "FP16"}


def device_precisions() -> list[str]:
    """The float precisions OpenVINO's CPU plugin lists for this CPU: fp32 first, then bf16/fp16."""
    import openvino as ov

    caps = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return ["fp32"] + [p for p, cap in CAPABILITIES.items() if cap in caps]


def device_name() -> str:
    import openvino as ov

    return str(ov.Core().get_property("CPU", "FULL_DEVICE_NAME"))


def save_ir(ov_model: Any, path: Path) -> None:
    """Write aside, then rename: a worker killed mid-write, or a sibling reading, never sees half a file."""
    import openvino as ov

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.xml")
    ov.save_model(ov_model, tmp, compress_to_fp16=False)
    os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
    os.replace(tmp, path)


def input_shape_of(ov_model: Any) -> tuple[int, int, int]:
    shape = ov_model.inputs[0].get_partial_shape()
    return (shape[1].get_length(), shape[2].get_length(), shape[3].get_length())


def classes_of(ov_model: Any) -> int:
    shape = ov_model.outputs[0].get_partial_shape()
    return int(np.prod([d.get_length() for d in list(shape)[1:]]))


class InferCall:
    """One infer request on a compiled model: float32 batch -> probabilities (a copy)."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self._request = compiled.create_infer_request()

    @property
    def threads(self) -> int:
        """The threads the compiled model runs on (INFERENCE_NUM_THREADS as the CPU plugin resolved it)."""
        return int(self.compiled.get_property("INFERENCE_NUM_THREADS"))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._request.infer({0: np.ascontiguousarray(x, dtype=np.float32)}, share_inputs=True)
        return self._request.get_output_tensor(0).data.copy()


def compiled_dir(cache_dir: str) -> Path:
    return Path(cache_dir) / "openvino" / "compiled"


@contextmanager
def compile_lock(cache_dir: str | None) -> Iterator[None]:
    """One compilation at a time per cache folder, across processes. OpenVINO's blob cache is not
    safe for two processes writing the same blob (seen with two Spark tasks' Python workers:
    "filesystem error: cannot set permissions"); waiting also lets the second load the first's
    blob instead of compiling again."""
    if not cache_dir:
        yield
        return
    folder = compiled_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as lock:  # closing the file releases the lock
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process compiling into %s", folder)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def threads_of(call: Callable[[np.ndarray], Any]) -> int:
    """The threads a compile_call call runs on; 0 for any other call."""
    return call.threads if isinstance(call, InferCall) else 0


def compile_call(ov_model: Any, precision: str, cache_dir: str | None, threads: int = 0) -> tuple[InferCall, str]:
    """(float32 batch -> probabilities, the precision the CPU actually runs).

    threads > 0 caps the model's threads (INFERSTACK_INFERENCE_THREADS); 0 leaves every core to it."""
    import openvino as ov

    core = ov.Core()
    if cache_dir:
        # Compiled blobs keyed by model and device: a restart skips the graph compilation.
        core.set_property({"CACHE_DIR": str(compiled_dir(cache_dir))})
    # LATENCY: one stream using every core (or `threads` of them), so a single request per worker
    # keeps the CPU busy without oversubscribing it.
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = threads
        # A capped model shares the machine with others (Spark tasks, several workers): pinned,
        # every 1-thread model binds to the same first core (measured: two 1-thread ResNet50
        # processes 3.8 + 3.8 img/s pinned, 7.9 + 7.7 unpinned, on 2 cores).
        config["ENABLE_CPU_PINNING"] = False
    if precision in HINTS:
        config["INFERENCE_PRECISION_HINT"] = HINTS[precision]
    with compile_lock(cache_dir):
        compiled = core.compile_model(ov_model, "CPU", config)
    hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    runs = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(hint)
    effective = "int8" if precision == "int8" else runs or precision
    if effective != precision:
        log.warning("%s asked for, but this CPU (%s) runs OpenVINO in %s: it lacks %s", precision,
                    core.get_property("CPU", "FULL_DEVICE_NAME"), effective,
                    "AMX/AVX512-BF16" if precision == "bf16" else "AVX512-FP16/AMX-FP16")
    return InferCall(compiled), effective
