"""Load the classifier once on the runtime runtime.resolve() chose: the one place that dispatches.

Loading (loading.py), labels (labels.py), the runtime choice (runtime.py) and the batch call
(classifier.py) each live in their own module; both runtimes give the same Classifier, so the
batching loop does not know which one runs. The names below stay importable from here (other
modules and branches import the model-loading entry points from ``inferstack_worker.model``).
"""

from __future__ import annotations

import logging

import numpy as np

from inferstack.config import Settings

from .classifier import Classifier, prepare_pixels
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
from .runtime import Plan, bucket_sizes, resolve

__all__ = [
    "BAKED_KERAS_HOME", "Classifier", "imagenet_labels", "link_baked_weights", "load_classifier",
    "load_keras_model", "prepare_pixels",
]

log = logging.getLogger("inferstack.worker")


def _keras_classifier(settings: Settings, plan: Plan) -> Classifier:
    from . import keras_runtime

    model, preprocess = load_keras_model(settings)
    name = model_name(settings.model)
    shape = input_shape_of(name, model.input_shape)
    labels = labels_for(settings, name, int(np.prod(model.output_shape[1:])))
    model = keras_runtime.with_precision(model, plan.precision)
    call, pad = keras_runtime.compile_call(model, preprocess, shape, xla=plan.xla)
    return Classifier(name, labels, shape, call, buckets=bucket_sizes(settings.batch_size) if pad else None,
                      runtime="keras", precision=plan.precision)


def _openvino_model(settings: Settings, plan: Plan, name: str) -> object:
    """The converted (and, for int8, quantized) OpenVINO model, from the cache when it holds one."""
    from . import openvino_runtime as ovr

    key = ovr.cache_key(settings, plan.precision, is_file_model(settings.model))
    ov_model = ovr.read_cached(settings.cache_dir, key)
    if ov_model is not None:
        return ov_model
    model, preprocess = load_keras_model(settings)
    shape = input_shape_of(name, model.input_shape)
    if settings.labels:  # a wrong labels file is refused before a long conversion
        labels_for(settings, name, int(np.prod(model.output_shape[1:])))
    log.info("converting %s to OpenVINO", name)
    ov_model = ovr.convert(model, preprocess, shape)
    if plan.precision == "int8":
        images = ovr.calibration_images(settings.calibration_dir or "", lambda p: prepare_pixels(p, shape), shape)
        ov_model = ovr.quantize(ov_model, images)
    ovr.write_cached(ov_model, settings.cache_dir, key)
    return ov_model


def _openvino_classifier(settings: Settings, plan: Plan) -> Classifier:
    from . import openvino_runtime as ovr

    name = model_name(settings.model)
    ov_model = _openvino_model(settings, plan, name)
    labels = labels_for(settings, name, ovr.classes_of(ov_model))
    call, effective = ovr.compile_call(ov_model, plan.precision, settings.cache_dir)
    return Classifier(name, labels, ovr.input_shape_of(ov_model), call, runtime="openvino", precision=effective)


def load_classifier(settings: Settings) -> Classifier:
    """The model of INFERSTACK_MODEL on the runtime and precision of INFERSTACK_RUNTIME/PRECISION."""
    configure_gpus()
    plan = resolve(settings)
    log.info("runtime %s, precision %s%s", plan.runtime, plan.precision, ", XLA" if plan.xla else "")
    if plan.runtime == "openvino":
        return _openvino_classifier(settings, plan)
    return _keras_classifier(settings, plan)
