"""Loading the Keras model of INFERSTACK_MODEL: a keras.applications name or a saved file."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from inferstack.config import ConfigError, Settings
from inferstack.contract.settings import default as setting_default
from inferstack.contract.settings import env_name

from .model_files import load_model_file

log = logging.getLogger("inferstack.worker")

BAKED_KERAS_HOME: str = setting_default("baked_keras_home")


def is_file_model(spec: str) -> bool:
    return spec.endswith((".keras", ".h5")) or os.sep in spec or os.path.exists(spec)


def model_name(spec: str) -> str:
    return os.path.basename(spec) if is_file_model(spec) else spec


def configure_gpus() -> None:
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


def input_shape_of(name: str, input_shape: Any) -> tuple[int, int, int]:
    """A Keras model's (h, w, c) input; ConfigError for several inputs or an unsupported channel count."""
    if isinstance(input_shape, list):
        raise ConfigError(f"model {name!r} has several inputs; an image classifier needs exactly one")
    _, h, w, c = input_shape
    shape = (h or 224, w or 224, c or 3)
    if shape[2] not in (1, 3):
        raise ConfigError(f"model {name!r} expects {shape[2]} channels; only 1 or 3 are supported")
    return shape


def _weights(settings: Settings) -> str | None:
    """INFERSTACK_WEIGHTS as keras.applications takes it."""
    if settings.weights.lower() == "none":
        return None
    if settings.weights == "imagenet" or os.path.exists(settings.weights):
        return settings.weights
    raise ConfigError(f"{env_name('weights')}={settings.weights!r}: use imagenet, none, or a weights file path")


def load_keras_model(settings: Settings) -> tuple[Any, Callable[[Any], Any] | None]:
    """INFERSTACK_MODEL is a keras.applications name or a saved model file: (fp32 model, preprocess)."""
    import keras

    spec = settings.model
    if is_file_model(spec):
        if not os.path.exists(spec):
            raise ConfigError(f"{env_name('model')} points to {spec!r}, which does not exist")
        log.info("loading saved model %s", spec)
        # A saved model carries its own preprocessing (e.g. a Rescaling layer) and sees 0..255 RGB.
        return load_model_file(spec), None
    factory = getattr(keras.applications, spec, None)
    if not callable(factory):
        names = sorted(n for n in dir(keras.applications) if n[:1].isupper())
        raise ConfigError(f"{env_name('model')}={spec!r} is neither a saved .keras file nor one of {', '.join(names)}")
    weights = _weights(settings)
    if weights == "imagenet" and link_baked_weights(settings.baked_keras_home):
        log.info("using ImageNet weights baked into the image")
    log.info("building %s (weights=%s)", spec, weights)
    model = factory(weights=weights)
    # Each architecture has its own preprocessing (caffe BGR means, [-1, 1], torch stats...).
    return model, getattr(sys.modules[factory.__module__], "preprocess_input", None)
