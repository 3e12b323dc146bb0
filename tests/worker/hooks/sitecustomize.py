"""Test hook, loaded by worker processes that tests start with this folder on PYTHONPATH.

Makes the model misbehave on marker images only (every pixel the same value), the way a model
with a pathological input would: INFERSTACK_TEST_HANG_VALUE blocks the model call forever,
INFERSTACK_TEST_SLOW_VALUE makes it take INFERSTACK_TEST_SLOW_S seconds. Other images, and
the all-zero warm-up batches, run normally.
"""

from __future__ import annotations

import os

_HANG = os.environ.get("INFERSTACK_TEST_HANG_VALUE")
_SLOW = os.environ.get("INFERSTACK_TEST_SLOW_VALUE")

if _HANG or _SLOW:
    import threading
    import time

    import numpy as np

    from inferstack_worker import model as _model

    _predict = _model.Classifier.predict

    def _marked(batch: np.ndarray, value: str | None) -> bool:
        if not value:
            return False
        flat = batch.reshape(batch.shape[0], -1)
        return bool(np.any(np.all(flat == float(value), axis=1)))

    def predict(self: _model.Classifier, batch: np.ndarray) -> np.ndarray:
        if _marked(batch, _HANG):
            threading.Event().wait()  # forever: a hung kernel, a deadlocked op
        if _marked(batch, _SLOW):
            time.sleep(float(os.environ.get("INFERSTACK_TEST_SLOW_S", "3")))
        return _predict(self, batch)

    _model.Classifier.predict = predict
