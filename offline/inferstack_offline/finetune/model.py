"""The network: a frozen backbone (pretrained base, preprocessing inside) and a new classifier head.

The exported model takes the 0..255 RGB pixels the worker prepares, holds its preprocessing as an
ordinary (frozen) layer and ends in a softmax, so the worker serves it as any saved `.keras` file,
loaded with `safe_mode=True`: only registered Keras layers, no Lambda.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from inferstack.config import ConfigError
from inferstack_worker.openvino_runtime import _file_digest as file_digest  # the worker's model-file key

# Input sizes of keras.applications architectures whose default is not 224 (include_top=False
# leaves the size open, and a served model needs a fixed one).
DEFAULT_SIZES = {
    "InceptionV3": 299, "InceptionResNetV2": 299, "Xception": 299, "NASNetLarge": 331,
    "EfficientNetB1": 240, "EfficientNetB2": 260, "EfficientNetB3": 300, "EfficientNetB4": 380,
    "EfficientNetB5": 456, "EfficientNetB6": 528, "EfficientNetB7": 600, "EfficientNetV2B1": 240,
    "EfficientNetV2B2": 260, "EfficientNetV2B3": 300, "EfficientNetV2S": 384, "EfficientNetV2M": 480,
    "EfficientNetV2L": 480,
}
# The variance given to a feature that is constant in training: (x - mean) / 1e15 is nothing.
IGNORED_VARIANCE = 1e30
# Layers between a classifier's last Dense and its output.
_AFTER_CLASSIFIER = ("Activation", "Softmax", "Dropout")


@dataclass
class Backbone:
    """uint8-range float images (n, h, w, c) -> pooled features (n, d); frozen."""

    model: Any
    input_shape: tuple[int, int, int]
    identity: dict[str, Any]  # what its features depend on: the feature cache key

    @property
    def dim(self) -> int:
        return int(self.model.output_shape[-1])


def is_model_file(base: str) -> bool:
    return base.endswith(".keras") or os.sep in base or os.path.exists(base)


def affine_preprocessing(preprocess: Callable[[np.ndarray], Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """An architecture's preprocess_input as y = W @ rgb + b per pixel (caffe's BGR means, [-1, 1],
    torch's mean/std are all of this form); None when it is the identity. Refuses anything else."""
    scale = 100.0
    probe = np.zeros((4, 1, 1, 3), np.float32)
    for j in range(3):
        probe[j + 1, 0, 0, j] = scale
    out = np.asarray(preprocess(probe.copy()), np.float64).reshape(4, 3)  # copy: some work in place
    bias = out[0]
    weights = ((out[1:] - bias) / scale).T  # weights[out, in]
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 3, 3)).astype(np.float32)
    expected = np.asarray(preprocess(x.copy()), np.float64)
    if not np.allclose(x @ weights.T + bias, expected, atol=1e-3):
        raise ConfigError("this architecture's preprocess_input is not a per-pixel affine map; "
                          "save a .keras model with its preprocessing inside and pass that as --base")
    if np.allclose(weights, np.eye(3)) and np.allclose(bias, 0):
        return None
    return weights.astype(np.float32), bias.astype(np.float32)


def _preprocessing_layer(weights: np.ndarray, bias: np.ndarray) -> Any:
    """The affine map as a frozen 1x1 convolution: a registered layer, exact, and cheap."""
    import keras

    layer = keras.layers.Conv2D(3, 1, name="preprocess", trainable=False)
    layer.build((None, None, None, 3))
    layer.set_weights([weights.T.reshape(1, 1, 3, 3), bias])
    return layer


def _weights_identity(weights: str, seed: int) -> str:
    if weights == "none":
        return f"none:seed={seed}"  # random features are only the same for the same seed
    if weights == "imagenet":
        return "imagenet"
    return "sha256:" + file_digest(weights)


def check_weights(weights: str) -> None:
    if weights not in ("imagenet", "none") and not os.path.isfile(weights):
        raise ConfigError(f"--weights {weights!r}: use imagenet, none, or the path of a weights file")


def application_backbone(name: str, weights: str, seed: int, image_size: int | None = None) -> Backbone:
    """A keras.applications architecture without its top, average-pooled, preprocessing inside."""
    import keras

    from inferstack_worker.model import link_baked_weights

    factory = getattr(keras.applications, name, None)
    if not callable(factory):
        names = sorted(n for n in dir(keras.applications) if n[:1].isupper())
        raise ConfigError(f"--base {name!r} is neither a .keras file nor one of {', '.join(names)}")
    check_weights(weights)
    if weights == "imagenet":
        link_baked_weights()
    size = image_size or DEFAULT_SIZES.get(name, 224)
    shape = (size, size, 3)
    keras.utils.set_random_seed(seed)
    net = factory(include_top=False, weights=None if weights == "none" else weights, input_shape=shape,
                  pooling="avg")
    inputs = keras.Input(shape, name="image")
    x = inputs
    affine = affine_preprocessing(getattr(sys.modules[factory.__module__], "preprocess_input"))
    if affine is not None:
        x = _preprocessing_layer(*affine)(x)
    model = keras.Model(inputs, net(x, training=False), name="backbone")
    identity = {"base": name, "weights": _weights_identity(weights, seed), "input_shape": list(shape)}
    return Backbone(model, shape, identity)


def _feature_output(base: Any, feature_layer: str | None) -> Any:
    """The symbolic tensor to pool: the named layer's output, or what the classifier Dense sees."""
    if feature_layer:
        try:
            return base.get_layer(feature_layer).output
        except ValueError:
            names = ", ".join(layer.name for layer in base.layers)
            raise ConfigError(f"--feature-layer {feature_layer!r} is not a layer of the base; it has: {names}") from None
    layers = list(base.layers)
    while layers and type(layers[-1]).__name__ in _AFTER_CLASSIFIER:
        layers.pop()
    if not layers or type(layers[-1]).__name__ != "Dense" or len(layers) < 2:
        raise ConfigError("cannot tell where the base's classifier starts (its last layers are not a Dense "
                          "classifier); name the layer whose output are the features with --feature-layer")
    return layers[-1].input


def file_backbone(path: str, weights: str, seed: int, feature_layer: str | None = None) -> Backbone:
    """A saved classifier (loaded in safe mode) cut before its classifier layer: its features are
    what that layer saw. The file already takes 0..255 pixels (the worker feeds it so)."""
    import keras

    from inferstack_worker.loading import input_shape_of
    from inferstack_worker.model_files import load_model_file

    if not os.path.isfile(path):
        raise ConfigError(f"--base {path!r} does not exist")
    base = load_model_file(path)
    if weights == "none":
        keras.utils.set_random_seed(seed)
        base = keras.models.clone_model(base)  # the architecture with freshly initialised weights
    elif weights != "imagenet":  # imagenet means "the file's own weights" here
        check_weights(weights)
        base.load_weights(weights)
    shape = input_shape_of(os.path.basename(path), base.input_shape)
    features = _feature_output(base, feature_layer)
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D()(features)
    elif len(features.shape) != 2:
        features = keras.layers.Flatten()(features)
    cut = keras.Model(base.inputs[0], features, name="backbone")
    identity = {"base": "sha256:" + file_digest(path), "weights": _weights_identity(weights, seed)
                if weights != "imagenet" else "file", "feature_layer": feature_layer, "input_shape": list(shape)}
    return Backbone(cut, shape, identity)


def load_backbone(base: str, weights: str, seed: int, feature_layer: str | None = None,
                  image_size: int | None = None) -> Backbone:
    """--base NAME (keras.applications) or --base model.keras, frozen."""
    if is_model_file(base):
        backbone = file_backbone(base, weights, seed, feature_layer)
    else:
        backbone = application_backbone(base, weights, seed, image_size)
    backbone.model.trainable = False
    return backbone


def feature_scaling(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and variance of the training features, for the head's first layer.

    A base's pooled features come at arbitrary scales (ReLU averages, some near zero, some in the
    hundreds); centring and scaling them is what lets one learning-rate grid fit every base. A
    feature that never varies in training (a unit no training image fires) teaches the head
    nothing and keeps its random weight, so it is scaled to nothing: it cannot swing an answer
    on a later image where it does fire.
    """
    x = np.asarray(x, np.float64)
    variance = x.var(axis=0)
    constant = variance <= 1e-6 * float(variance.mean()) + 1e-30
    variance[constant] = IGNORED_VARIANCE
    return x.mean(axis=0).astype(np.float32), variance.astype(np.float32)


def build_head(dim: int, classes: int, units: int, dropout: float, l2: float,
               scaling: tuple[np.ndarray, np.ndarray] | None = None) -> Any:
    """The new classifier: [standardise,] [dropout, dense relu] when units > 0, then dropout and a
    softmax layer. `scaling` (see feature_scaling) is stored in the layer's config, not trained."""
    import keras

    reg = keras.regularizers.L2(l2) if l2 > 0 else None
    layers: list[Any] = [keras.Input((dim,), name="features")]
    if scaling is not None:
        mean, variance = scaling
        layers.append(keras.layers.Normalization(mean=mean, variance=variance, name="standardise"))
    if units > 0:
        layers += [keras.layers.Dropout(dropout), keras.layers.Dense(units, activation="relu", kernel_regularizer=reg)]
    layers += [keras.layers.Dropout(dropout), keras.layers.Dense(classes, activation="softmax", kernel_regularizer=reg)]
    return keras.Sequential(layers, name="head")


def head_for(data: dict[str, np.ndarray], settings: dict[str, Any]) -> Any:
    """The head a trial's settings describe, standardising with the training features' statistics."""
    return build_head(data["x"].shape[1], int(data["classes"]), settings["units"], settings["dropout"],
                      settings["l2"], feature_scaling(data["x"]))


def assemble(backbone: Backbone, head: Any) -> Any:
    """image -> backbone (BatchNorm in inference mode, always) -> head -> probabilities."""
    import keras

    inputs = keras.Input(backbone.input_shape, name="image")
    outputs = head(backbone.model(inputs, training=False))
    return keras.Model(inputs, outputs, name="finetuned")


def unfreeze_top(backbone: Backbone, n: int) -> list[str]:
    """Make the top n weighted layers of the backbone trainable (BatchNormalization stays frozen,
    as the Keras transfer-learning guide advises); returns their names."""
    import keras

    def weighted(layer: Any) -> list[Any]:
        if isinstance(layer, keras.Model):
            return [sub for inner in layer.layers for sub in weighted(inner)]
        return [layer] if layer.weights else []

    layers = [layer for layer in weighted(backbone.model)
              if not isinstance(layer, keras.layers.BatchNormalization) and layer.name != "preprocess"]
    chosen = layers[-n:] if n > 0 else []
    # A model's flag is pushed down to all its layers: set it first, then each layer's own.
    backbone.model.trainable = True
    for layer in weighted(backbone.model):
        layer.trainable = any(layer is c for c in chosen)
    return [layer.name for layer in chosen]
