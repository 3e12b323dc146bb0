"""The OpenVINO model owns its weights: freeing the Keras model it was converted from (and the
memory being reused) must not change a single answer."""

from __future__ import annotations

import gc

import numpy as np

from inferstack.config import Settings
from inferstack_worker.model import load_classifier


def test_answers_survive_the_keras_models_memory_being_reused(digits_model):
    import tensorflow as tf

    clf = load_classifier(Settings(model=str(digits_model["path"]), labels=str(digits_model["labels"]),
                                   runtime="openvino", precision="fp32"))
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    before = clf.predict(x)
    gc.collect()  # the converted-from Keras model is gone; its variables' buffers are free
    # TensorFlow's allocator hands those buffers out again (sizes of the digits model's variables).
    churn = [tf.fill([n], 7.0) for n in (16, 432, 7840, 10, 1000, 10000) for _ in range(50)]
    after = clf.predict(x)
    assert len(churn) == 300
    np.testing.assert_array_equal(after, before)
