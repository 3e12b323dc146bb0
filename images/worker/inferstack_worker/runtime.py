"""Which runtime and precision a worker runs, resolved once at start-up; impossible pairs are refused."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

from inferstack.config import ConfigError, Settings

log = logging.getLogger("inferstack.worker")


@dataclass(frozen=True)
class Plan:
    runtime: str  # keras | openvino
    precision: str  # fp32 | bf16 | fp16 | int8 (what was asked for; the hardware may run less)
    gpu: bool  # Keras sees a GPU: XLA compilation and fixed batch shapes

    @property
    def xla(self) -> bool:
        return self.runtime == "keras" and self.gpu


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def keras_backend() -> str:
    import keras

    return keras.backend.backend()


def gpu_available() -> bool:
    backend = keras_backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return jax.default_backend() == "gpu"
    if backend == "torch":
        import torch

        return bool(torch.cuda.is_available())
    return False


def bucket_sizes(batch_size: int) -> list[int]:
    """Batch shapes a shape-specialising compiler (XLA, JAX) sees: powers of two, then the batch size."""
    sizes = [1 << i for i in range(batch_size.bit_length()) if (1 << i) < batch_size]
    return sizes + [batch_size]


def resolve(settings: Settings) -> Plan:
    gpu = gpu_available()
    runtime = settings.runtime
    if runtime == "auto":
        # OpenVINO converts through TensorFlow; on a GPU node Keras with XLA is the fast path.
        runtime = "openvino" if not gpu and openvino_installed() and keras_backend() == "tensorflow" else "keras"
    elif runtime == "openvino":
        if not openvino_installed():
            raise ConfigError(
                "INFERSTACK_RUNTIME=openvino but the openvino package is not installed; "
                "install the worker extra (pip install 'inferstack[worker]') or use INFERSTACK_RUNTIME=keras"
            )
        if keras_backend() != "tensorflow":
            raise ConfigError(
                f"INFERSTACK_RUNTIME=openvino converts the model through TensorFlow, but KERAS_BACKEND is "
                f"{keras_backend()!r}; set KERAS_BACKEND=tensorflow or use INFERSTACK_RUNTIME=keras"
            )
    precision = settings.precision
    if precision == "auto":
        # OpenVINO's bf16 hint runs bf16 only where the CPU has it (AMX, AVX512-BF16), else f32.
        precision = "bf16" if runtime == "openvino" else "fp16" if gpu else "fp32"
    if precision == "int8":
        if runtime != "openvino":
            raise ConfigError(
                "INFERSTACK_PRECISION=int8 needs INFERSTACK_RUNTIME=openvino (post-training quantization "
                f"with NNCF); the {runtime} runtime{' on this GPU node' if gpu else ''} runs fp32, bf16 or fp16"
            )
        if not settings.calibration_dir:
            raise ConfigError(
                "INFERSTACK_PRECISION=int8 needs calibration images: set INFERSTACK_CALIBRATION_DIR to a "
                "folder of a few hundred representative images (JPEG/PNG), or choose fp32 or bf16"
            )
        if not os.path.isdir(settings.calibration_dir):
            raise ConfigError(f"INFERSTACK_CALIBRATION_DIR={settings.calibration_dir!r} is not a folder")
        if importlib.util.find_spec("nncf") is None:
            raise ConfigError("INFERSTACK_PRECISION=int8 needs the nncf package (pip install 'inferstack[worker]')")
    if runtime == "keras" and not gpu and precision == "fp16":
        raise ConfigError(
            "INFERSTACK_PRECISION=fp16 with Keras needs a GPU (CPU kernels have no fast fp16); "
            "use fp32 or bf16, or INFERSTACK_RUNTIME=openvino"
        )
    if runtime == "keras" and not gpu and precision == "bf16":
        log.warning("Keras bf16 on CPU is only faster with AMX/AVX512-BF16; without them expect it slower than fp32")
    return Plan(runtime=runtime, precision=precision, gpu=gpu)
