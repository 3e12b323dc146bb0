"""Shared fixtures: a small Keras model trained here on a real data set, real photos, stacks."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import numpy as np
import pytest

from tests.helpers import (  # noqa: F401 (digits_env, stack_log: older imports from here)
    DIGIT_LABELS,
    DIGIT_SIZE,
    digit_images,
    digits_env,
    jpeg_bytes,
    png_bytes,
    stack_log,
)
from tools.devstack import LocalStack

# The real Kubernetes control plane fixtures (tests/chart, tests/cluster).
pytest_plugins = ("tests.kubeplane",)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The operator's timer interval is fixed when its handlers module is imported, and the chart
# tests import it before tests/operator/ is collected: set the fast test interval here.
os.environ["INFERSTACK_OPERATOR_RESYNC_SECONDS"] = "1"

@pytest.fixture(scope="session")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Train a small CNN on 1500 digits, save it as .keras with a labels file; 297 held out."""
    import keras

    keras.utils.set_random_seed(0)
    images, target = digit_images()
    x_train, y_train = images[:1500], target[:1500]
    x_test, y_test = images[1500:], target[1500:]
    model = keras.Sequential(
        [
            keras.Input((DIGIT_SIZE, DIGIT_SIZE, 3)),
            keras.layers.Rescaling(1 / 255.0),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(4),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train.astype("float32"), y_train, epochs=12, batch_size=32, verbose=0)
    folder = tmp_path_factory.mktemp("digits")
    path = folder / "digits.keras"
    model.save(path)
    labels = folder / "labels.txt"
    labels.write_text("\n".join(DIGIT_LABELS) + "\n")
    return {"path": str(path), "labels": str(labels), "x_test": x_test, "y_test": y_test}


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """Real photographs shipped with scikit-image, as JPEG and PNG uploads."""
    import skimage.data

    return {
        "chelsea.jpg": jpeg_bytes(skimage.data.chelsea()),
        "coffee.jpg": jpeg_bytes(skimage.data.coffee()),
        "astronaut.png": png_bytes(skimage.data.astronaut()),
        "rocket.jpg": jpeg_bytes(skimage.data.rocket()),
    }


@pytest.fixture(scope="module")
def make_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LocalStack]]:
    """Start a LocalStack (real redis-server, workers, gunicorn); stopped at module end."""
    stacks: list[LocalStack] = []

    def make(workers: int = 1, env: dict[str, str] | None = None, wait: bool = True) -> LocalStack:
        logs = tmp_path_factory.mktemp("stack-logs")
        stack = LocalStack(env=env, log_dir=str(logs))
        stacks.append(stack)
        stack.start(workers=workers, wait=wait)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture(scope="module")
def in_process(digits_model) -> Callable[[bytes], np.ndarray]:
    """The digits model's saved file called directly: what a served answer must equal."""
    import keras

    from inferstack.imaging import decode_image

    model = keras.saving.load_model(digits_model["path"], compile=False)

    def predict(upload: bytes) -> np.ndarray:
        x = decode_image(upload, (DIGIT_SIZE, DIGIT_SIZE)).astype(np.float32)[None]
        return np.asarray(model(x, training=False))[0]

    return predict
