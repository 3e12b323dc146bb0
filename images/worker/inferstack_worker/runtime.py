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
    precision: str  # auto | fp32 | bf16 | fp16 | int8 (what was asked for; the hardware may run less)
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
    if precision == "auto" and runtime == "keras" and not gpu:
        # Keras on CPU has one fast path: bf16 needs AMX/AVX512-BF16 kernels TensorFlow seldom uses.
        log.info("precision auto with Keras on CPU: fp32, the only precision its CPU kernels run fast")
        precision = "fp32"
    # Otherwise auto stays auto: the loader times each precision the device offers (precision_choice).
    _check_auto_int8(settings, runtime, precision)
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


def _check_auto_int8(settings: Settings, runtime: str, precision: str) -> None:
    if not settings.auto_int8:
        return
    if settings.precision != "auto":
        raise ConfigError(
            f"INFERSTACK_AUTO_INT8=1 switches precision by measurement; it needs INFERSTACK_PRECISION=auto, "
            f"got {settings.precision!r}"
        )
    if runtime != "openvino":
        raise ConfigError(
            f"INFERSTACK_AUTO_INT8=1 quantizes with OpenVINO and NNCF; the {runtime} runtime cannot run int8 "
            "(use INFERSTACK_RUNTIME=openvino or auto on a CPU node)"
        )
    if importlib.util.find_spec("nncf") is None:
        raise ConfigError("INFERSTACK_AUTO_INT8=1 needs the nncf package (pip install 'inferstack[worker]')")
