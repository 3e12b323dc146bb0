"""Load the classifier once and expose one compiled batch call: uint8 images -> probabilities.

The runtime (Keras or OpenVINO) and precision come from runtime.resolve(); both give the same
Classifier, so the batching loop does not know which one runs."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from inferstack.config import ConfigError, Settings

from .model_files import load_model_file, read_labels
from .runtime import Plan, bucket_sizes, resolve

log = logging.getLogger("inferstack.worker")


def imagenet_labels() -> list[str]:
    text = resources.files("inferstack").joinpath("data/imagenet_labels.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _is_file_model(spec: str) -> bool:
    return spec.endswith((".keras", ".h5")) or os.sep in spec or os.path.exists(spec)


def _configure_gpus() -> None:
    # Grab GPU memory as needed instead of all of it up front (TensorFlow's default).
    try:
        import tensorflow as tf
    except ImportError:
        return
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass


BAKED_KERAS_HOME = "/opt/keras"


def link_baked_weights(baked_home: str | None = None) -> int:
    """Make weights baked into the image visible in the cache folder Keras will actually use.

    Keras ignores an unwritable KERAS_HOME and falls back to /tmp/.keras, where it would try a
    download; pods run with a read-only root file system, so link the baked files there.
    Returns how many files were linked.
    """
    baked = Path(baked_home or BAKED_KERAS_HOME) / "models"
    if not baked.is_dir():
        return 0
    home = os.path.expanduser(os.environ.get("KERAS_HOME") or os.path.join("~", ".keras"))
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
    target = Path(home) / "models"
    if target.resolve() == baked.resolve():
        return 0
    target.mkdir(parents=True, exist_ok=True)
    linked = 0
    for f in baked.iterdir():
        dest = target / f.name
        if not dest.exists():
            dest.symlink_to(f)
            linked += 1
    return linked


def prepare_pixels(pixels: np.ndarray, input_shape: tuple[int, int, int]) -> np.ndarray:
    """One queued uint8 image -> float32 (h, w, c) at the model's size."""
    h, w, c = input_shape
    if pixels.shape[:2] != (h, w):
        pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR))
    x = pixels.astype(np.float32)
    if c == 1 and x.shape[2] == 3:
        x = x @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
    return x


class Classifier:
    """An image classifier behind one compiled batch call (Keras or OpenVINO), with its labels."""

    def __init__(
        self,
        name: str,
        labels: list[str],
        input_shape: tuple[int, int, int],
        call: Callable[[np.ndarray], Any],
        *,
        buckets: list[int] | None = None,
        runtime: str = "keras",
        precision: str = "fp32",
    ) -> None:
        self.name = name
        self.labels = labels
        self.input_shape = input_shape
        self.runtime = runtime
        self.precision = precision
        self._call = call
        # Shape-specialising compilers (XLA, JAX) see only these batch sizes: no compile while serving.
        self._buckets = sorted(buckets) if buckets else None

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        return prepare_pixels(pixels, self.input_shape)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, h, w, c) -> probabilities (n, classes)."""
        n = batch.shape[0]
        if self._buckets:
            size = next((b for b in self._buckets if b >= n), n)
            if size != n:
                batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), batch.dtype)])
        out = self._call(batch)
        return np.asarray(out, dtype=np.float32).reshape(out.shape[0], -1)[:n]

    def warm_up(self, batch_size: int) -> None:
        sizes = set(self._buckets) if self._buckets else {1, batch_size}
        for n in sorted(sizes):
            self.predict(np.zeros((n, *self.input_shape), np.float32))

    def top_k(self, probs: np.ndarray, k: int) -> list[dict[str, Any]]:
        k = min(k, probs.shape[0])
        idx = np.argpartition(-probs, k - 1)[:k]
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        return [{"label": self.labels[i], "probability": float(probs[i])} for i in idx]

    def info(self) -> dict[str, Any]:
        # Labels let the web tier answer the v2 classification extension from a probability vector.
        return {"name": self.name, "input_shape": list(self.input_shape), "classes": len(self.labels),
                "labels": self.labels, "runtime": self.runtime, "precision": self.precision}


def _input_shape(name: str, input_shape: Any) -> tuple[int, int, int]:
    if isinstance(input_shape, list):
        raise ConfigError(f"model {name!r} has several inputs; an image classifier needs exactly one")
    _, h, w, c = input_shape
    shape = (h or 224, w or 224, c or 3)
    if shape[2] not in (1, 3):
        raise ConfigError(f"model {name!r} expects {shape[2]} channels; only 1 or 3 are supported")
    return shape


def _labels(settings: Settings, name: str, classes: int) -> list[str]:
    if settings.labels:
        labels = read_labels(settings.labels)
        if classes != len(labels):
            raise ConfigError(f"the labels list has {len(labels)} entries but model {name!r} outputs {classes} classes")
        return labels
    if classes == 1000:
        return imagenet_labels()
    log.warning("no INFERSTACK_LABELS for a %d-class model: labels will be class indices", classes)
    return [str(i) for i in range(classes)]


def _model_name(spec: str) -> str:
    return os.path.basename(spec) if _is_file_model(spec) else spec


def load_keras_model(settings: Settings) -> tuple[Any, Callable[[Any], Any] | None]:
    """INFERSTACK_MODEL is a keras.applications name or a saved model file: (fp32 model, preprocess)."""
    import keras

    spec = settings.model
    if _is_file_model(spec):
        if not os.path.exists(spec):
            raise ConfigError(f"INFERSTACK_MODEL points to {spec!r}, which does not exist")
        log.info("loading saved model %s", spec)
        # A saved model carries its own preprocessing (e.g. a Rescaling layer) and sees 0..255 RGB.
        return load_model_file(spec), None
    factory = getattr(keras.applications, spec, None)
    if not callable(factory):
        names = sorted(n for n in dir(keras.applications) if n[:1].isupper())
        raise ConfigError(f"INFERSTACK_MODEL={spec!r} is neither a saved .keras file nor one of {', '.join(names)}")
    weights: str | None
    if settings.weights.lower() == "none":
        weights = None
    elif settings.weights == "imagenet":
        weights = "imagenet"
    elif os.path.exists(settings.weights):
        weights = settings.weights
    else:
        raise ConfigError(f"INFERSTACK_WEIGHTS={settings.weights!r}: use imagenet, none, or a weights file path")
    if weights == "imagenet" and link_baked_weights(settings.baked_keras_home):
        log.info("using ImageNet weights baked into the image")
    log.info("building %s (weights=%s)", spec, weights)
    model = factory(weights=weights)
    # Each architecture has its own preprocessing (caffe BGR means, [-1, 1], torch stats...).
    return model, getattr(sys.modules[factory.__module__], "preprocess_input", None)


# Layers whose output is the pooled image representation the classifier head reads.
_POOLING = ("GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten")


def feature_model(model: Any) -> Any:
    """The model cut before its classifier head: (batch, features), the pooled representation.

    That is the output of the last global pooling (or Flatten) layer, else the input of the last
    Dense layer (a transfer model whose backbone pools itself); flattened if it is not 2-D."""
    import keras

    pooled = next((layer.output for layer in reversed(model.layers) if type(layer).__name__ in _POOLING), None)
    if pooled is None:
        dense = next((layer for layer in reversed(model.layers) if isinstance(layer, keras.layers.Dense)), None)
        if dense is None:
            raise ConfigError("the model has no pooling, Flatten or Dense layer to take features before")
        pooled = dense.input
    if len(pooled.shape) != 2:
        pooled = keras.layers.Flatten()(pooled)
    return keras.Model(model.inputs, pooled, name=f"{model.name}_features")


def _keras_classifier(settings: Settings, plan: Plan, features: bool = False) -> Classifier:
    from . import keras_runtime

    model, preprocess = load_keras_model(settings)
    name = _model_name(settings.model)
    shape = _input_shape(name, model.input_shape)
    labels = [] if features else _labels(settings, name, int(np.prod(model.output_shape[1:])))
    if features:
        model = feature_model(model)
    model = keras_runtime.with_precision(model, plan.precision)
    call, pad = keras_runtime.compile_call(model, preprocess, shape, xla=plan.xla)
    return Classifier(name, labels, shape, call, buckets=bucket_sizes(settings.batch_size) if pad else None,
                      runtime="keras", precision=plan.precision)


def _openvino_classifier(settings: Settings, plan: Plan, features: bool = False) -> Classifier:
    from . import openvino_runtime as ovr

    name = _model_name(settings.model)
    key = ovr.cache_key(settings, plan.precision, _is_file_model(settings.model))
    if key and features:
        key += "-features"
    ov_model = ovr.read_cached(settings.cache_dir, key)
    if ov_model is None:
        model, preprocess = load_keras_model(settings)
        shape = _input_shape(name, model.input_shape)
        if settings.labels and not features:  # a wrong labels file is refused before a long conversion
            _labels(settings, name, int(np.prod(model.output_shape[1:])))
        if features:
            model = feature_model(model)
        log.info("converting %s to OpenVINO", name)
        ov_model = ovr.convert(model, preprocess, shape)
        if plan.precision == "int8":
            images = ovr.calibration_images(settings.calibration_dir or "", lambda p: prepare_pixels(p, shape), shape)
            ov_model = ovr.quantize(ov_model, images)
        ovr.write_cached(ov_model, settings.cache_dir, key)
    shape = ovr.input_shape_of(ov_model)
    labels = [] if features else _labels(settings, name, ovr.classes_of(ov_model))
    call, effective = ovr.compile_call(ov_model, plan.precision, settings.cache_dir)
    return Classifier(name, labels, shape, call, runtime="openvino", precision=effective)


def load_classifier(settings: Settings, features: bool = False) -> Classifier:
    """The model of INFERSTACK_MODEL on the runtime and precision of INFERSTACK_RUNTIME/PRECISION.

    features=True: the same model cut before its classifier head (see feature_model); predict()
    then returns embeddings and there are no labels."""
    _configure_gpus()
    plan = resolve(settings)
    log.info("runtime %s, precision %s%s", plan.runtime, plan.precision, ", XLA" if plan.xla else "")
    if plan.runtime == "openvino":
        return _openvino_classifier(settings, plan, features)
    return _keras_classifier(settings, plan, features)
