"""Worker model loading details that the end-to-end tests cannot reach."""

from __future__ import annotations

import numpy as np
import pytest

from inferstack.config import ConfigError, Settings
from inferstack_worker.model import link_baked_weights, load_classifier

from tests.helpers import DIGIT_LABELS


def test_baked_weights_are_linked_into_the_cache_keras_uses(tmp_path, monkeypatch):
    baked = tmp_path / "baked"
    (baked / "models").mkdir(parents=True)
    (baked / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels.h5").write_bytes(b"weights")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    assert link_baked_weights(str(baked)) == 1
    linked = home / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
    assert linked.is_symlink() and linked.read_bytes() == b"weights"
    assert link_baked_weights(str(baked)) == 0  # idempotent
    assert link_baked_weights(str(tmp_path / "absent")) == 0


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="neither a saved .keras file nor one of"):
        load_classifier(Settings(model="ResNet51", weights="none"))


def test_missing_model_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_classifier(Settings(model=str(tmp_path / "model.keras")))


def test_labels_must_match_the_model_outputs(digits_model, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    with pytest.raises(ConfigError, match="3 entries but model"):
        load_classifier(Settings(model=str(digits_model["path"]), labels=str(labels)))


def test_top_k_is_sorted_and_clamped(digits_model):
    clf = load_classifier(Settings(model=str(digits_model["path"]), labels=str(digits_model["labels"])))
    probs = np.array([0.05, 0.5, 0.1, 0.0, 0.2, 0.05, 0.0, 0.05, 0.05, 0.0], np.float32)
    top = clf.top_k(probs, 3)
    assert [p["label"] for p in top] == ["one", "four", "two"]
    assert len(clf.top_k(probs, 1000)) == 10
    info = clf.info()
    assert {k: info[k] for k in ("name", "input_shape", "classes", "labels")} == {
        "name": "digits.keras", "input_shape": [32, 32, 3], "classes": 10, "labels": DIGIT_LABELS}
