"""`inferstack finetune` end to end: a real transfer (a CNN trained here on digits 0-4 is the base,
digits 5-9 are the new classes, 20 photos each), the search on local Spark, and the exported model
served by the local stack in fp32 and OpenVINO int8."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import requests

from inferstack.client import main as inferstack_main
from inferstack.imaging import decode_image
from tests.helpers import DIGIT_LABELS, DIGIT_SIZE, digit_images, png_bytes, stack_log
from tools.devstack import LocalStack

NEW = list(range(5, 10))
PER_CLASS = 20
# One setting that cannot learn in its few epochs, so the search has a worst to beat.
SEARCH = "lr=3e-3,1e-5 units=0,64 epochs=40 patience=5 batch=16"


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return digit_images()


@pytest.fixture(scope="module")
def base_model(digits, tmp_path_factory) -> str:
    """A small CNN trained on digits 0-4 only, saved as the .keras base."""
    import keras

    images, target = digits
    old = target < 5
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((DIGIT_SIZE, DIGIT_SIZE, 3)),
        keras.layers.Rescaling(1 / 255.0),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(4),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(5, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(images[old].astype("float32"), target[old], epochs=10, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("base") / "digits-0-4.keras"
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def photos(digits, tmp_path_factory) -> dict:
    """20 images of each new digit as PNG files in class folders (plus two files that are not
    images); every other 5-9 digit is held out."""
    images, target = digits
    rng = np.random.default_rng(0)
    chosen = {d: rng.choice(np.flatnonzero(target == d), PER_CLASS, replace=False) for d in NEW}
    root = tmp_path_factory.mktemp("photos")
    for d, idx in chosen.items():
        folder = root / DIGIT_LABELS[d]
        folder.mkdir()
        for i in idx:
            (folder / f"{i}.png").write_bytes(png_bytes(images[i]))
    (root / "five" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "six" / "notes.txt").write_text("taken on a Tuesday")
    train = np.concatenate(list(chosen.values()))
    held = np.setdiff1d(np.flatnonzero(target >= 5), train)
    return {"root": str(root), "train": train, "held": held}


@pytest.fixture(scope="module")
def finetuned(base_model, photos, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("finetuned")
    inferstack_main(["finetune", photos["root"], "--out", str(out), "--base", base_model, "--search", SEARCH,
                     "--master", "local[2]", "--fine-tune-layers", "1", "--fine-tune-epochs", "8", "--no-progress"])
    return {"out": out, "metrics": json.loads((out / "metrics.json").read_text())}


def held_out(digits, photos) -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits as the worker sees them (decoded from PNG), and their new class index."""
    images, target = digits
    x = np.stack([decode_image(png_bytes(images[i]), (DIGIT_SIZE, DIGIT_SIZE)) for i in photos["held"]])
    labels = sorted(DIGIT_LABELS[d] for d in NEW)
    return x.astype(np.float32), np.array([labels.index(DIGIT_LABELS[target[i]]) for i in photos["held"]])


def whole_network_from_scratch_accuracy(base_model: str, digits, photos, x: np.ndarray, y: np.ndarray) -> float:
    """The base architecture with fresh weights and a head, all trained end to end on all 20
    images per class (training and validation images together, 40 epochs)."""
    import keras

    from inferstack_offline.finetune.model import build_head, load_backbone

    images, target = digits
    labels = sorted(DIGIT_LABELS[d] for d in NEW)
    backbone = load_backbone(base_model, "none", seed=1)
    backbone.model.trainable = True
    model = keras.Sequential([keras.Input(backbone.input_shape), backbone.model,
                              build_head(backbone.dim, len(NEW), 0, 0.2, 0.0)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    train = photos["train"]
    y_train = np.array([labels.index(DIGIT_LABELS[target[i]]) for i in train])
    model.fit(images[train].astype(np.float32), y_train, epochs=40, batch_size=16, verbose=0)
    return float(np.mean(np.asarray(model(x, training=False)).argmax(axis=1) == y))


def the_runs_split(root: str, metrics: dict) -> dict[str, np.ndarray]:
    """The run's own training/validation split of the 20 per class, decoded as the pipeline
    decodes them: pixels x, xv and labels y, yv."""
    from inferstack_offline.finetune.dataset import Skipped, list_items, scan, split
    from inferstack_offline.finetune.tune import pixel_batches

    _, examples = scan(list_items(root, Skipped()), Skipped(), progress=False)
    skipped = {s["path"] for s in metrics["images"]["skipped"]}  # the files the run could not decode
    usable = [e for e in examples if e.path not in skipped]
    train, val = split(usable, metrics["options"]["val_split"], metrics["options"]["seed"])
    shape = (DIGIT_SIZE, DIGIT_SIZE, 3)
    (x, y), (xv, yv) = pixel_batches(train, shape, len(train))[0], pixel_batches(val, shape, len(val))[0]
    return {"x": x, "y": y, "xv": xv, "yv": yv}


def chosen_head_accuracy(features: Callable[[np.ndarray], np.ndarray], pixels: dict[str, np.ndarray],
                         metrics: dict, x: np.ndarray, y: np.ndarray) -> float:
    """The head the search chose (its settings and seed, early stopping on the same validation
    images), trained by the search's own code on `features` of the pixels instead of the base's."""
    from inferstack_offline.finetune.model import head_for
    from inferstack_offline.finetune.search import TRIAL_ENV, train_trial

    search = metrics["search"]
    best = search["trials"][search["best"]]
    trial = {"index": best["index"], "seed": metrics["options"]["seed"] + best["index"], "settings": best["settings"]}
    data = {"x": features(pixels["x"]), "y": pixels["y"], "xv": features(pixels["xv"]), "yv": pixels["yv"],
            "classes": np.array(len(NEW))}
    with pytest.MonkeyPatch.context() as mp:  # a trial sets these for its executor, not for this process
        for name, value in TRIAL_ENV.items():
            mp.setenv(name, os.environ.get(name, value))
        weights = train_trial(trial, data)["weights"]
    head = head_for(data, best["settings"])
    head.set_weights(weights)
    return float(np.mean(np.asarray(head(features(x), training=False)).argmax(axis=1) == y))


def test_transfer_reaches_90_percent_and_beats_the_same_head_trained_from_scratch(finetuned, base_model, digits,
                                                                                 photos):
    """Transfer against the same head trained from scratch, on the same 20 per class: the chosen
    head (a) on the preprocessed pixels alone and (b) on the base architecture with random frozen
    weights (the one difference from transfer: the base's weights were not learnt on 0-4). Also
    measured for the record, not asserted: (c) a whole CNN trained end to end from scratch, which
    does better than transfer on these easy 8x8 digits (docs/finetune.md). The figures go to
    OUT/baselines.json."""
    import keras

    from inferstack_offline.finetune.model import load_backbone
    from inferstack_worker.model_files import load_model_file

    model = load_model_file(str(finetuned["out"] / "model.keras"))  # safe_mode=True, as the worker loads it
    x, y = held_out(digits, photos)
    metrics = finetuned["metrics"]
    pixels = the_runs_split(photos["root"], metrics)
    rescale = load_model_file(base_model).layers[0]  # the base's own preprocessing
    assert isinstance(rescale, keras.layers.Rescaling)
    random_base = load_backbone(base_model, "none", seed=metrics["options"]["seed"]).model
    figures = {
        "held_out_images": len(y), "head_settings": metrics["best"]["settings"],
        "transfer": float(np.mean(np.asarray(model(x, training=False)).argmax(axis=1) == y)),
        "head_on_pixels": chosen_head_accuracy(lambda p: np.asarray(rescale(p)).reshape(len(p), -1),
                                               pixels, metrics, x, y),
        "head_on_random_base": chosen_head_accuracy(lambda p: np.asarray(random_base(p, training=False)),
                                                    pixels, metrics, x, y),
        "whole_network_from_scratch": whole_network_from_scratch_accuracy(base_model, digits, photos, x, y),
    }
    (finetuned["out"] / "baselines.json").write_text(json.dumps(figures, indent=1))
    print(f"\nheld-out digits 5-9: {json.dumps(figures)}")
    assert figures["transfer"] >= 0.90
    # Measured 94.3% against (a) 91.7% and (b) 87.1%, identical from run to run (fixed seeds).
    assert figures["transfer"] >= figures["head_on_pixels"] + 0.015
    assert figures["transfer"] >= figures["head_on_random_base"] + 0.05


def test_outputs_metrics_plots_and_calibration(finetuned, photos):
    out, m = finetuned["out"], finetuned["metrics"]
    labels = (out / "labels.txt").read_text().split()
    assert labels == sorted(DIGIT_LABELS[d] for d in NEW)  # the class folder names
    assert m["classes"] == labels
    skipped = {Path(s["path"]).name: s["error"] for s in m["images"]["skipped"]}
    assert set(skipped) == {"broken.jpg", "notes.txt"}
    assert "not a supported image" in skipped["notes.txt"]
    assert m["images"]["train"] + m["images"]["val"] == PER_CLASS * len(NEW)
    best = m["best"]
    assert set(best["per_class_accuracy"]) == set(labels)
    matrix = np.array(best["confusion_matrix"])
    assert matrix.shape == (5, 5) and matrix.sum() == m["images"]["val"]
    assert best["val_top1"] == pytest.approx(np.trace(matrix) / matrix.sum())
    for png in ("search.png", "confusion.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    calibration = sorted((out / "calibration").iterdir())
    assert len(calibration) == PER_CLASS * len(NEW)  # every usable image, up to the worker's 300
    assert all(p.suffix == ".png" for p in calibration)


def test_fine_tuning_trains_the_top_base_layer_and_keeps_it_only_if_validation_holds(finetuned):
    m = finetuned["metrics"]
    tuned = m["fine_tune"]
    assert len(tuned["layers"]) == 1 and tuned["layers"][0].startswith("conv2d")
    assert tuned["val_top1_before"] == m["search"]["trials"][m["search"]["best"]]["val_top1"]
    assert tuned["kept"] == (tuned["val_top1_after"] >= tuned["val_top1_before"])
    assert m["best"]["val_top1"] == pytest.approx(max(tuned["val_top1_after"], tuned["val_top1_before"]))


def test_search_beats_its_worst_setting_and_trials_ran_side_by_side(finetuned):
    search = finetuned["metrics"]["search"]
    trials = search["trials"]
    assert len(trials) == 4 and not any("error" in t for t in trials)
    scores = [t["val_top1"] for t in trials]
    best = trials[search["best"]]
    assert best["val_top1"] == max(scores) > min(scores)
    assert best["settings"]["lr"] == 3e-3
    assert finetuned["metrics"]["best"]["settings"] == best["settings"]
    # Two Spark slots: some trials ran at the same time, in different executor processes.
    overlapping = [(a["index"], b["index"]) for a in trials for b in trials
                   if a["index"] < b["index"] and a["start"] < b["end"] and b["start"] < a["end"]]
    assert overlapping
    assert len({t["worker"] for t in trials}) >= 2
    assert search["sum_trial_s"] == pytest.approx(sum(t["seconds"] for t in trials))
    print(f"\n{len(trials)} trials: {search['sum_trial_s']:.1f} s of training in {search['wall_s']:.1f} s "
          f"on {search['slots']} slots (speedup {search['parallel_speedup']:.2f})")


def served_classes(stack: LocalStack, images: list[bytes], labels: list[str]) -> np.ndarray:
    def one(upload: bytes) -> int:
        r = requests.post(stack.url + "/predict", files={"image": ("d.png", upload)}, params={"top_k": 1}, timeout=60)
        assert r.status_code == 200, r.text + stack_log(stack)
        return labels.index(r.json()["predictions"][0]["label"])

    with ThreadPoolExecutor(8) as pool:
        return np.array(list(pool.map(one, images)))


def test_the_stack_serves_the_model_with_its_labels_and_int8_agrees_with_fp32(finetuned, digits, photos,
                                                                               tmp_path_factory):
    out = finetuned["out"]
    labels = (out / "labels.txt").read_text().split()
    images, _ = digits
    uploads = [png_bytes(images[i]) for i in photos["held"]]
    env = {"INFERSTACK_MODEL": str(out / "model.keras"), "INFERSTACK_LABELS": str(out / "labels.txt"),
           "INFERSTACK_BATCH_SIZE": "16"}
    classes = {}
    for runtime, precision in (("keras", "fp32"), ("openvino", "int8")):
        extra = {"INFERSTACK_RUNTIME": runtime, "INFERSTACK_PRECISION": precision,
                 "INFERSTACK_CALIBRATION_DIR": str(out / "calibration")}
        with LocalStack(env={**env, **extra}, log_dir=str(tmp_path_factory.mktemp(precision))) as stack:
            stack.start(workers=1)
            classes[precision] = served_classes(stack, uploads, labels)
            if precision == "fp32":
                r = requests.post(stack.url + "/predict", files={"image": ("d.png", uploads[0])}, timeout=60)
                assert r.ok and {p["label"] for p in r.json()["predictions"]} == set(labels)
                body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                    "data": [base64.b64encode(uploads[0]).decode()]}],
                        "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}
                v2 = requests.post(f"{stack.url}/v2/models/model/infer", json=body, timeout=60)
                assert v2.status_code == 200, v2.text
                _, index, label = v2.json()["outputs"][0]["data"][0].split(":")
                assert label == labels[int(index)] == r.json()["predictions"][0]["label"]
    agreement = float(np.mean(classes["int8"] == classes["fp32"]))
    print(f"\nint8 agrees with fp32 on {agreement:.3%} of {len(uploads)} held-out digits")
    assert agreement >= 0.99


def test_classes_with_too_few_images_are_named(base_model, digits, tmp_path):
    images, target = digits
    for d, n in ((5, 6), (6, 2), (7, 1)):
        folder = tmp_path / "data" / DIGIT_LABELS[d]
        folder.mkdir(parents=True)
        for i in np.flatnonzero(target == d)[:n]:
            (folder / f"{i}.png").write_bytes(png_bytes(images[i]))
    proc = subprocess.run([sys.executable, "-m", "inferstack.client", "finetune", str(tmp_path / "data"),
                           "--out", str(tmp_path / "out"), "--base", base_model, "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "2 class(es) have fewer than 5 usable images: seven (1), six (2)" in proc.stderr


def test_classify_does_not_load_tensorflow_or_spark():
    code = ("import sys\nfrom inferstack.client import main\ntry:\n    main(['classify', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('tensorflow', 'keras', 'pyspark') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stderr
