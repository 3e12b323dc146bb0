"""The Keras runtime: one compiled batch call per backend, optionally in mixed precision with XLA."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

log = logging.getLogger("inferstack.worker")

POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def limit_threads(threads: int) -> int:
    """Run TensorFlow's ops on `threads` threads (intra- and inter-op; 0: its default, every core).

    TensorFlow fixes its thread pools when its runtime starts (the first op): call this before.
    Returns the intra-op threads in force (0: TensorFlow's default)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return 0
    import tensorflow as tf

    threading = tf.config.threading
    if threads > 0 and threading.get_intra_op_parallelism_threads() != threads:
        try:
            threading.set_intra_op_parallelism_threads(threads)
            threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # already started in this process (another model loaded first)
            log.warning("TensorFlow already runs on %d thread(s) in this process; "
                        "INFERSTACK_INFERENCE_THREADS=%d applies from the next start",
                        threading.get_intra_op_parallelism_threads(), threads)
    return int(threading.get_intra_op_parallelism_threads())


def with_precision(model: Any, precision: str) -> Any:
    """A copy of the model whose layers compute in bf16/fp16 (variables stay float32).

    The last layer stays float32 so probabilities keep their resolution (Keras' own advice).
    A saved model records each layer's dtype, so a global policy would not reach it: clone instead.
    """
    if precision == "fp32":
        return model
    import keras

    policy = POLICIES[precision]
    last = model.layers[-1]

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if "dtype" in config:  # layers; plain ops inside a functional graph (keras.ops.add...) have none
            config["dtype"] = keras.DTypePolicy("float32" if layer is last else policy)
        return layer.__class__.from_config(config)

    # recursive: a transfer model's nested backbone is converted too, not left in float32.
    mixed = keras.models.clone_model(model, clone_function=clone, recursive=True)
    mixed.set_weights(model.get_weights())
    return mixed


def compile_call(
    model: Any, preprocess: Callable[[Any], Any] | None, input_shape: tuple[int, int, int], xla: bool
) -> tuple[Callable[[np.ndarray], Any], bool]:
    """(float32 batch -> outputs, whether batches must be padded to fixed shapes)."""
    import keras

    backend = keras.backend.backend()
    h, w, c = input_shape

    def forward(x: Any) -> Any:
        if preprocess is not None:
            x = preprocess(x)
        return model(x, training=False)

    if backend == "tensorflow":
        import tensorflow as tf

        # One trace for every batch size; XLA then compiles per concrete shape, hence the padding.
        fn = tf.function(forward, input_signature=[tf.TensorSpec([None, h, w, c], tf.float32)], jit_compile=xla)
        return (lambda x: fn(tf.constant(x)).numpy()), xla
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def jitted(tv: Any, ntv: Any, x: Any) -> Any:
            if preprocess is not None:
                x = preprocess(x)
            y, _ = model.stateless_call(tv, ntv, x, training=False)
            return y

        # jit specialises on shape: always pad to a fixed set of batch sizes.
        return (lambda x: np.asarray(jitted(trainable, frozen, x))), True
    if backend == "torch":
        import torch

        def call(x: np.ndarray) -> Any:
            with torch.no_grad():
                y = forward(torch.from_numpy(x).to(next(iter(model.parameters())).device))
            return y.detach().float().cpu().numpy()

        return call, False
    return (lambda x: np.asarray(forward(x))), False
