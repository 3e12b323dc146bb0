"""Checks on the model and labels files a worker is pointed at (they may come from a user's volume).

A legacy ``.h5``/``.hdf5`` whole-model file can carry a Lambda layer's marshalled Python code,
which Keras runs on load whatever ``safe_mode`` says; ``.keras`` archives are loaded with
``safe_mode=True`` (Keras >= 3.14, see pyproject.toml, closes the known bypasses: CVE-2025-1550,
CVE-2025-8747, CVE-2025-9906, CVE-2026-1462). Weights-only files (``*.weights.h5``) hold arrays
and no code, and stay allowed.
"""

from __future__ import annotations

import os
from typing import Any

from inferstack.config import ConfigError

LEGACY_SUFFIXES = (".h5", ".hdf5")
# 1000 ImageNet classes take ~10 KiB; a labels file 100x that is not a labels file.
MAX_LABELS_BYTES = 1024 * 1024
MAX_LABEL_CHARS = 1000


def check_model_file(path: str) -> None:
    """Refuse model formats that can run code when loaded."""
    if path.lower().endswith(LEGACY_SUFFIXES):
        raise ConfigError(
            f"model {path!r} is a legacy HDF5 whole-model file, which can run arbitrary code when loaded; "
            "re-save it as .keras (model.save('model.keras')) and point INFERSTACK_MODEL at that")


def load_model_file(path: str) -> Any:
    """A saved .keras model, loaded so that it cannot run code it carries."""
    check_model_file(path)
    import keras

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as exc:
        if "safe_mode" not in str(exc):
            raise
        raise ConfigError(
            f"model {path!r} holds code (e.g. a Lambda layer) that Keras' safe mode refuses to load; "
            "rebuild it from registered layers") from None


def read_labels(path: str) -> list[str]:
    """One class name per line, UTF-8 text, at most MAX_LABELS_BYTES."""
    try:
        size = os.path.getsize(path)
        if size > MAX_LABELS_BYTES:
            raise ConfigError(f"labels file {path!r} is {size} bytes; a labels file is at most {MAX_LABELS_BYTES}")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_LABELS_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read labels file {path!r}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"labels file {path!r} is not UTF-8 text (one class name per line)") from None
    if "\0" in text:
        raise ConfigError(f"labels file {path!r} is binary, not text (one class name per line)")
    labels = [line for line in text.splitlines() if line.strip()]
    if not labels:
        raise ConfigError(f"labels file {path!r} holds no labels (one class name per line)")
    too_long = next((i for i, label in enumerate(labels) if len(label) > MAX_LABEL_CHARS), None)
    if too_long is not None:
        raise ConfigError(f"labels file {path!r}: line {too_long + 1} is longer than {MAX_LABEL_CHARS} characters")
    return labels
