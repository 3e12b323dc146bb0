"""Load the classifier once on the runtime runtime.resolve() chose: the one place that dispatches.

Loading (loading.py), labels (labels.py), the runtime choice (runtime.py) and the batch call
(classifier.py) each live in their own module; both runtimes give the same Classifier, so the
batching loop does not know which one runs. The names below stay importable from here (other
modules and branches import the model-loading entry points from ``inferstack_worker.model``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from inferstack.config import ConfigError, Settings

from .classifier import Classifier, prepare_pixels
from .cpu_quota import threads_within_quota
from .labels import imagenet_labels, labels_for
from .loading import (
    BAKED_KERAS_HOME,
    configure_gpus,
    input_shape_of,
    is_file_model,
    link_baked_weights,
    load_keras_model,
    model_name,
)
from . import precision_choice
from .runtime import Plan, bucket_sizes, resolve

__all__ = [
    "BAKED_KERAS_HOME", "Classifier", "feature_model", "imagenet_labels", "link_baked_weights", "load_classifier",
    "load_keras_model", "prepare_pixels",
]

log = logging.getLogger("inferstack.worker")


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

    threads = keras_runtime.limit_threads(settings.inference_threads)  # before the model's first op
    model, preprocess = load_keras_model(settings)
    name = model_name(settings.model)
    shape = input_shape_of(name, model.input_shape)
    labels = [] if features else labels_for(settings, name, int(np.prod(model.output_shape[1:])))
    if features:
        model = feature_model(model)
    pads: list[bool] = []

    def compile_one(precision: str) -> tuple[Any, str]:
        call, pad = keras_runtime.compile_call(keras_runtime.with_precision(model, precision), preprocess, shape,
                                               xla=plan.xla)
        pads.append(pad)
        return call, precision

    status: dict[str, Any] = {}
    if plan.precision == "auto":  # a GPU node: mixed fp16 or bf16 (or fp32), whichever runs fastest
        # Timed at the batch size and at 1, both compiled bucket shapes: no padding needed to time them.
        choice, call = precision_choice.measure(compile_one, list(keras_runtime.POLICIES), shape,
                                                settings.batch_size, settings.precision_trials)
        precision, status = choice.chosen, {"auto": choice.info()}
    else:
        precision = plan.precision
        call, _ = compile_one(precision)
    return Classifier(name, labels, shape, call, buckets=bucket_sizes(settings.batch_size) if pads[0] else None,
                      runtime="keras", precision=precision, choice=status, threads=threads)


def _openvino_model(settings: Settings, precision: str, name: str, features: bool = False,
                    converted: object | None = None) -> object:
    """The converted (and, for int8, quantized) OpenVINO model, from the cache when it holds one.

    ``converted``: the float model already converted in this process (auto quantizes it for int8)."""
    from . import openvino_runtime as ovr

    key = _openvino_key(settings, precision, features)
    ov_model = ovr.read_cached(settings.cache_dir, key)
    if ov_model is not None:
        return ov_model
    if converted is None:
        converted = _convert(settings, name, features)
    ov_model = converted
    if precision == "int8":
        shape = ovr.input_shape_of(converted)
        images = ovr.calibration_images(settings.calibration_dir or "", lambda p: prepare_pixels(p, shape), shape)
        ov_model = ovr.quantize(converted, images)
    ovr.write_cached(ov_model, settings.cache_dir, key)
    return ov_model


def _convert(settings: Settings, name: str, features: bool) -> object:
    from . import openvino_runtime as ovr

    model, preprocess = load_keras_model(settings)
    shape = input_shape_of(name, model.input_shape)
    if settings.labels and not features:  # a wrong labels file is refused before a long conversion
        labels_for(settings, name, int(np.prod(model.output_shape[1:])))
    if features:
        model = feature_model(model)
    log.info("converting %s to OpenVINO", name)
    return ovr.convert(model, preprocess, shape)


def _openvino_key(settings: Settings, precision: str, features: bool) -> str | None:
    from . import openvino_runtime as ovr

    key = ovr.cache_key(settings, precision, is_file_model(settings.model))
    return key + "-features" if key and features else key


def _openvino_classifier(settings: Settings, plan: Plan, features: bool = False) -> Classifier:
    from . import openvino_runtime as ovr

    name = model_name(settings.model)
    if plan.precision == "auto":
        from .openvino_auto import load_auto

        float_model = _openvino_model(settings, "fp32", name, features)
        labels = [] if features else labels_for(settings, name, ovr.classes_of(float_model))

        def model_for(precision: str) -> object:
            if precision == "fp32":
                return float_model
            return _openvino_model(settings, precision, name, features, converted=float_model)

        return load_auto(settings, name, labels, model_for, _openvino_key(settings, "fp32", features))
    ov_model = _openvino_model(settings, plan.precision, name, features)
    labels = [] if features else labels_for(settings, name, ovr.classes_of(ov_model))
    call, effective = ovr.compile_call(ov_model, plan.precision, settings.cache_dir, settings.inference_threads)
    return Classifier(name, labels, ovr.input_shape_of(ov_model), call, runtime="openvino", precision=effective,
                      threads=call.threads)


def load_classifier(settings: Settings, features: bool = False) -> Classifier:
    """The model of INFERSTACK_MODEL on the runtime and precision of INFERSTACK_RUNTIME/PRECISION.

    features=True: the same model cut before its classifier head (see feature_model); predict()
    then returns embeddings and there are no labels."""
    configure_gpus()
    settings = threads_within_quota(settings)
    plan = resolve(settings)
    log.info("runtime %s, precision %s%s", plan.runtime, plan.precision, ", XLA" if plan.xla else "")
    if plan.runtime == "openvino":
        return _openvino_classifier(settings, plan, features)
    return _keras_classifier(settings, plan, features)
