"""The stages of `inferstack finetune` on their own: the feature cache and its resumption, the
search grammar, named (keras.applications) bases with their preprocessing inside."""

from __future__ import annotations

import numpy as np
import pytest

from inferstack.config import ConfigError
from inferstack_offline.finetune.dataset import Skipped, list_items, scan, split
from inferstack_offline.finetune.features import cache_folder, compute_features
from inferstack_offline.finetune.search import make_trials, parse_search
from tests.helpers import DIGIT_SIZE, digit_images, png_bytes

SHAPE = (DIGIT_SIZE, DIGIT_SIZE, 3)
IDENTITY = {"base": "test", "weights": "none", "input_shape": list(SHAPE)}


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    images, target = digit_images()
    root = tmp_path_factory.mktemp("data")
    for label, digit in (("a", 0), ("b", 1)):
        (root / label).mkdir()
        for i in np.flatnonzero(target == digit)[:5]:
            (root / label / f"{i}.png").write_bytes(png_bytes(images[i]))
    skipped = Skipped()
    labels, found = scan(list_items(str(root), skipped), skipped, progress=False)
    assert labels == ["a", "b"] and not skipped.files
    return found


def summary(batch: np.ndarray) -> np.ndarray:
    """A stand-in backbone: two numbers per image."""
    return np.stack([batch.mean(axis=(1, 2, 3)), batch.std(axis=(1, 2, 3))], axis=1).astype(np.float32)


def test_an_interrupted_feature_run_keeps_its_work_and_a_rerun_computes_only_the_rest(examples, tmp_path):
    calls: list[int] = []

    def interrupted(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second batch
        return summary(batch)

    with pytest.raises(KeyboardInterrupt):
        compute_features(examples, IDENTITY, SHAPE, interrupted, str(tmp_path), Skipped(), batch_size=4,
                         progress=False)
    assert list(cache_folder(str(tmp_path), IDENTITY).glob("part-*.parquet"))

    kept, features, stats = compute_features(examples, IDENTITY, SHAPE, summary, str(tmp_path), Skipped(),
                                             batch_size=4, progress=False)
    assert (stats.reused, stats.computed) == (4, 6)
    assert [e.digest for e in kept] == [e.digest for e in examples]
    _, fresh, _ = compute_features(examples, IDENTITY, SHAPE, summary, str(tmp_path / "other"), Skipped(),
                                   progress=False)
    np.testing.assert_allclose(features, fresh, rtol=1e-6)

    def must_not_run(batch: np.ndarray) -> np.ndarray:
        raise AssertionError("every feature was cached")

    _, again, stats = compute_features(examples, IDENTITY, SHAPE, must_not_run, str(tmp_path), Skipped(),
                                       progress=False)
    assert (stats.reused, stats.computed) == (10, 0)
    np.testing.assert_array_equal(again, features)
    # Another base (or weights, or size) is another key: nothing is reused.
    _, _, stats = compute_features(examples, {**IDENTITY, "weights": "imagenet"}, SHAPE, summary, str(tmp_path),
                                   Skipped(), progress=False)
    assert (stats.reused, stats.computed) == (0, 10)


def test_a_table_of_paths_and_labels_is_data_too(examples, tmp_path):
    from inferstack_offline.finetune.dataset import DataError

    rows = ["path,label"] + [f"{e.path},{'cat' if e.label else 'dog'}" for e in examples]
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "x.png").write_bytes(open(examples[0].path, "rb").read())
    rows += ["photos/x.png,dog", "photos/missing.png,dog", "photos/y.png,"]
    table = tmp_path / "labels.csv"
    table.write_text("\n".join(rows) + "\n")
    skipped = Skipped()
    labels, found = scan(list_items(str(table), skipped), skipped, progress=False)
    assert labels == ["cat", "dog"] and len(found) == len(examples)
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in ((s["path"], s["error"]) for s in skipped.files)}
    assert reasons["labels.csv:13"] == "row without a path or a label"
    assert "No such file" in reasons["missing.png"]
    assert reasons["x.png"].startswith("the same image as ")  # a copy of an image already listed
    (tmp_path / "bad.csv").write_text("file,class\na.png,dog\n")
    with pytest.raises(DataError, match="needs columns 'path' and 'label'"):
        list_items(str(tmp_path / "bad.csv"), Skipped())


def test_split_is_stratified_and_does_not_depend_on_listing_order(examples):
    train, val = split(examples, 0.2, seed=0)
    assert sorted(e.label for e in val) == [0, 1]
    assert {e.digest for e in train} | {e.digest for e in val} == {e.digest for e in examples}
    train2, val2 = split(list(reversed(examples)), 0.2, seed=0)
    assert {e.digest for e in val2} == {e.digest for e in val}


def test_search_grammar():
    grid = parse_search("lr=1e-3,3e-4 units=0,256 dropout=0.5")
    assert grid == {"lr": [1e-3, 3e-4], "units": [0, 256], "dropout": [0.5]}
    trials = make_trials(grid, None, seed=7)
    assert len(trials) == 4 and trials[0]["settings"]["epochs"] == 30 and trials[3]["seed"] == 10
    assert len(make_trials(grid, 2, seed=7)) == 2
    for bad, message in (("lr=fast", "not a number"), ("momentum=0.9", "NAME one of lr, dropout"),
                         ("dropout=1.5", "fraction below 1"), ("lr=0", "positive"), ("lr", "NAME=V1,V2"),
                         ("units=0.5", "whole numbers")):
        with pytest.raises(ConfigError, match=message):
            parse_search(bad)


@pytest.mark.parametrize("module", ["resnet50", "mobilenet_v2", "densenet", "efficientnet"])
def test_each_architectures_preprocessing_becomes_one_frozen_layer(module):
    import keras

    from inferstack_offline.finetune.model import _preprocessing_layer, affine_preprocessing

    preprocess = getattr(keras.applications, module).preprocess_input
    affine = affine_preprocessing(preprocess)
    if module == "efficientnet":  # rescales inside the model already
        assert affine is None
        return
    x = np.random.default_rng(1).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(_preprocessing_layer(*affine)(x)), np.asarray(preprocess(x.copy())),
                               atol=1e-3)


def test_a_named_base_exports_a_safe_model_and_fine_tuning_keeps_batchnorm_frozen(tmp_path):
    import keras

    from inferstack_offline.finetune.model import assemble, build_head, load_backbone, unfreeze_top
    from inferstack_worker.model_files import load_model_file

    backbone = load_backbone("MobileNetV2", "none", seed=0, image_size=32)
    assert backbone.input_shape == (32, 32, 3) and backbone.identity["weights"] == "none:seed=0"
    model = assemble(backbone, build_head(backbone.dim, 3, 16, 0.2, 1e-4))
    path = tmp_path / "model.keras"
    model.save(path)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    loaded = load_model_file(str(path))  # safe_mode=True: no Lambda anywhere
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-5)
    assert np.asarray(loaded(x)).sum(axis=1) == pytest.approx([1, 1], abs=1e-5)

    names = unfreeze_top(backbone, 3)
    trainable = [w.path for w in backbone.model.trainable_weights]
    assert len(names) == 3 and trainable and all(any(n in p for n in names) for p in trainable)
    bn = [layer for layer in backbone.model.get_layer("mobilenetv2_1.00_32").layers
          if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn and not any(layer.trainable for layer in bn)


def test_the_kubernetes_job_example_is_valid_and_its_command_parses():
    import argparse
    from pathlib import Path

    import kubernetes_validate
    import yaml

    from inferstack_offline.finetune.cli import add_arguments

    path = Path(__file__).resolve().parents[2] / "operator" / "examples" / "spark" / "finetune-job.yaml"
    job = yaml.safe_load(path.read_text())
    kubernetes_validate.validate(job, "1.31", strict=True)
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["inferstack", "finetune"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(command[2:])
    assert (args.out, args.fine_tune_layers) == ("/models/flowers", 10)
    parse_search(args.search)


def test_the_head_standardises_features_whatever_their_scale(tmp_path):
    """A base's features can sit far from zero at any scale: the class signal here is a +-1 shift on
    a feature near 10,000 (and one feature never varies in training). The head centres and scales
    them with the training statistics, so an ordinary learning rate finds the signal, and the
    statistics travel inside the saved head."""
    import keras

    from inferstack_offline.finetune.search import train_trial

    rng = np.random.default_rng(0)

    def features(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        x = np.stack([10_000 + (2 * y - 1) + rng.normal(0, 0.3, n), np.full(n, 5.0)], axis=1)
        return x.astype(np.float32), y

    (x, y), (xv, yv) = features(64), features(64)
    data = {"x": x, "y": y, "xv": xv, "yv": yv, "classes": np.array(2)}
    settings = {"lr": 1e-2, "dropout": 0.0, "units": 0, "l2": 0.0, "epochs": 40, "batch": 16, "patience": 40}
    trial = train_trial({"index": 0, "seed": 0, "settings": settings}, data)
    assert trial["val_top1"] == 1.0

    from inferstack_offline.finetune.model import head_for

    head = head_for(data, settings)
    head.set_weights(trial["weights"])
    path = tmp_path / "head.keras"
    head.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    moved = xv.copy()
    moved[:, 1] = 50.0  # the feature that never varied in training now does: no overflow
    probs = np.asarray(loaded(moved))
    assert np.isfinite(probs).all()
    assert np.array_equal(probs.argmax(axis=1), np.asarray(head(xv)).argmax(axis=1))
