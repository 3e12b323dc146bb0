"""Model and labels files from a user's volume cannot run code in, or overwhelm, the worker."""

from __future__ import annotations

import pytest

from inferstack.config import ConfigError, Settings
from inferstack_worker.model import load_classifier
from inferstack_worker.model_files import MAX_LABELS_BYTES, read_labels


def test_legacy_h5_model_is_refused_before_keras_opens_it(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n")  # never parsed: the name alone is refused
    with pytest.raises(ConfigError, match="legacy HDF5 whole-model file"):
        load_classifier(Settings(model=str(path)))
    upper = tmp_path / "MODEL.HDF5"
    upper.write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(ConfigError, match="legacy HDF5"):
        load_classifier(Settings(model=str(upper)))


def test_keras_archive_with_code_is_refused(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                              keras.layers.Lambda(lambda x: x * 2.0), keras.layers.Dense(2, activation="softmax")])
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(ConfigError, match="safe mode refuses"):
        load_classifier(Settings(model=str(path)))


def test_a_plain_keras_model_still_loads(digits_model):
    clf = load_classifier(Settings(model=str(digits_model["path"]), labels=str(digits_model["labels"])))
    assert clf.labels[:2] == ["zero", "one"]


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00b\x00i\x00n", "not UTF-8 text"),
    (b"cat\x00dog\n", "binary"),
    (b"\n \n", "holds no labels"),
    (b"x" * 1001 + b"\n", "longer than 1000 characters"),
])
def test_labels_must_be_text(tmp_path, content, message):
    path = tmp_path / "labels.txt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        read_labels(str(path))


def test_labels_file_size_is_bounded(tmp_path):
    path = tmp_path / "labels.txt"
    with path.open("wb") as fh:
        fh.truncate(MAX_LABELS_BYTES + 1)  # sparse: no disk used
    with pytest.raises(ConfigError, match="a labels file is at most"):
        read_labels(str(path))
    with pytest.raises(ConfigError, match="cannot read labels file"):
        read_labels(str(tmp_path / "missing.txt"))
    path.write_text("tabby cat\r\n\n Egyptian cat\n")
    assert read_labels(str(path)) == ["tabby cat", " Egyptian cat"]
