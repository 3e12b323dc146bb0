"""Stage 3 (optional): fine-tune the top layers of the base together with the chosen head.

As the Keras transfer-learning guide does it: a low learning rate, a few epochs, and the base
called with training=False so BatchNormalization keeps its ImageNet statistics. Images are
decoded batch by batch (memory stays bounded whatever the data set's size).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from inferstack.config import Settings

from .dataset import Example, load_pixels, read_file
from .model import Backbone, unfreeze_top
from .search import top_k_accuracy


def pixel_batches(examples: list[Example], input_shape: tuple[int, int, int], batch_size: int,
                  shuffle_seed: int | None = None) -> Any:
    """A keras PyDataset of (pixels, labels), decoded as serving decodes them."""
    import keras

    settings = Settings.from_env()

    class Pixels(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.order = np.arange(len(examples))
            self.rng = np.random.default_rng(shuffle_seed)
            self.on_epoch_end()

        def __len__(self) -> int:
            return (len(examples) + batch_size - 1) // batch_size

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            chosen = [examples[j] for j in self.order[i * batch_size:(i + 1) * batch_size]]
            x = np.stack([load_pixels(read_file(e.path, settings), input_shape, settings) for e in chosen])
            return x, np.array([e.label for e in chosen], np.int64)

        def on_epoch_end(self) -> None:
            if shuffle_seed is not None:
                self.rng.shuffle(self.order)

    return Pixels()


def predict(model: Any, examples: list[Example], input_shape: tuple[int, int, int], batch_size: int = 32) -> np.ndarray:
    """Class probabilities of the whole model for each example, in order."""
    batches = pixel_batches(examples, input_shape, batch_size)
    return np.concatenate([np.asarray(model(batches[i][0], training=False)) for i in range(len(batches))])


def _epoch_bar(epochs: int, progress: bool | None) -> Any:
    import keras
    from tqdm import tqdm

    class Bar(keras.callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            self.bar = tqdm(total=epochs, desc="fine-tune", unit="epoch",
                            disable=None if progress is None else not progress)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.bar.update(1)
            self.bar.set_postfix(val_loss=f"{(logs or {}).get('val_loss', float('nan')):.4f}")

        def on_train_end(self, logs: Any = None) -> None:
            self.bar.close()

    return Bar()


def fine_tune(model: Any, backbone: Backbone, train: list[Example], val: list[Example], *, layers: int,
              lr: float, epochs: int, batch_size: int, seed: int, before_top1: float,
              progress: bool | None = None) -> dict[str, Any]:
    """Train the top `layers` of the base and the head; keep the result only if validation
    accuracy does not drop. Returns what happened, for metrics.json."""
    import keras

    t0 = time.monotonic()
    keep = model.get_weights()
    names = unfreeze_top(backbone, layers)
    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy")
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    history = model.fit(pixel_batches(train, backbone.input_shape, batch_size, shuffle_seed=seed),
                        validation_data=pixel_batches(val, backbone.input_shape, batch_size), epochs=epochs,
                        callbacks=[stop, _epoch_bar(epochs, progress)], verbose=0)
    backbone.model.trainable = False
    probs = predict(model, val, backbone.input_shape, batch_size)
    y = np.array([e.label for e in val])
    after = top_k_accuracy(probs, y, 1)
    kept = after >= before_top1
    if not kept:
        model.set_weights(keep)
    return {"layers": names, "lr": lr, "epochs": len(history.history["val_loss"]),
            "val_top1_before": before_top1, "val_top1_after": after, "kept": kept,
            "seconds": time.monotonic() - t0}
