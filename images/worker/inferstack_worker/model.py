"""Load a Keras classifier once and expose one compiled batch call: uint8 images -> probabilities."""

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


class Classifier:
    """A Keras image classifier with its preprocessing and labels."""

    def __init__(self, model: Any, name: str, labels: list[str], preprocess: Callable[[Any], Any] | None) -> None:
        import keras

        self.model = model
        self.name = name
        self.labels = labels
        shape = model.input_shape
        if isinstance(shape, list):
            raise ConfigError(f"model {name!r} has several inputs; an image classifier needs exactly one")
        _, h, w, c = shape
        self.input_shape = (h or 224, w or 224, c or 3)
        if self.input_shape[2] not in (1, 3):
            raise ConfigError(f"model {name!r} expects {self.input_shape[2]} channels; only 1 or 3 are supported")
        self.backend = keras.backend.backend()
        self._call, self._pad = self._compile(preprocess)
        classes = int(np.prod(model.output_shape[1:]))
        if classes != len(labels):
            raise ConfigError(
                f"the labels list has {len(labels)} entries but model {name!r} outputs {classes} classes"
            )

    def _compile(self, preprocess: Callable[[Any], Any] | None) -> tuple[Callable[[np.ndarray], Any], bool]:
        model = self.model
        h, w, c = self.input_shape

        def forward(x: Any) -> Any:
            if preprocess is not None:
                x = preprocess(x)
            return model(x, training=False)

        if self.backend == "tensorflow":
            import tensorflow as tf

            # One trace for every batch size: the batch dimension stays dynamic.
            fn = tf.function(forward, input_signature=[tf.TensorSpec([None, h, w, c], tf.float32)])
            return (lambda x: fn(tf.constant(x)).numpy()), False
        if self.backend == "jax":
            import jax

            trainable = [v.value for v in model.trainable_variables]
            frozen = [v.value for v in model.non_trainable_variables]

            @jax.jit
            def jitted(tv: Any, ntv: Any, x: Any) -> Any:
                if preprocess is not None:
                    x = preprocess(x)
                y, _ = model.stateless_call(tv, ntv, x, training=False)
                return y

            # jit specialises on shape: pad batches to powers of two to bound recompiles.
            return (lambda x: np.asarray(jitted(trainable, frozen, x))), True
        if self.backend == "torch":
            import torch

            def call(x: np.ndarray) -> Any:
                with torch.no_grad():
                    y = forward(torch.from_numpy(x).to(next(iter(model.parameters())).device))
                return y.detach().cpu().numpy()

            return call, False
        return (lambda x: np.asarray(forward(x))), False

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """One queued uint8 image -> float32 (h, w, c) at the model's size."""
        h, w, c = self.input_shape
        if pixels.shape[:2] != (h, w):
            pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR))
        x = pixels.astype(np.float32)
        if c == 1 and x.shape[2] == 3:
            x = x @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
        return x

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, h, w, c) -> probabilities (n, classes)."""
        n = batch.shape[0]
        if self._pad:
            size = 1 << (n - 1).bit_length()
            if size != n:
                batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), batch.dtype)])
        out = self._call(batch)
        return np.asarray(out, dtype=np.float32).reshape(out.shape[0], -1)[:n]

    def warm_up(self, batch_size: int) -> None:
        sizes = {1, batch_size}
        if self._pad:
            sizes = {1 << i for i in range((batch_size - 1).bit_length() + 1)}
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
                "labels": self.labels}


def load_classifier(settings: Settings) -> Classifier:
    """INFERSTACK_MODEL is a keras.applications name or a saved model file."""
    _configure_gpus()
    import keras

    spec = settings.model
    if _is_file_model(spec):
        if not os.path.exists(spec):
            raise ConfigError(f"INFERSTACK_MODEL points to {spec!r}, which does not exist")
        log.info("loading saved model %s", spec)
        model = load_model_file(spec)
        # A saved model carries its own preprocessing (e.g. a Rescaling layer) and sees 0..255 RGB.
        preprocess = None
        name = os.path.basename(spec)
    else:
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
        preprocess = getattr(sys.modules[factory.__module__], "preprocess_input", None)
        name = spec
    labels = read_labels(settings.labels) if settings.labels else None
    if labels is None:
        classes = int(np.prod(model.output_shape[1:]))
        if classes == 1000:
            labels = imagenet_labels()
        else:
            log.warning("no INFERSTACK_LABELS for a %d-class model: labels will be class indices", classes)
            labels = [str(i) for i in range(classes)]
    return Classifier(model, name, labels, preprocess)
