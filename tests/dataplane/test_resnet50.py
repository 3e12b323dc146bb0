"""ResNet50 through the keras.applications path: its own preprocess_input, ImageNet label order."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from inferstack.imaging import decode_image


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """ResNet50 weights made here (no download possible): random, with a sharpened classifier head
    so each photo gets a clear, image-dependent top class."""
    import keras

    keras.utils.set_random_seed(1)
    model = keras.applications.ResNet50(weights=None)
    head = model.get_layer("predictions")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 40.0, bias])
    path = tmp_path_factory.mktemp("resnet") / "resnet50.weights.h5"
    model.save_weights(path)
    return str(path), model


@pytest.fixture(scope="module")
def stack(make_stack, resnet_weights):
    path, _ = resnet_weights
    return make_stack(workers=1, env={"INFERSTACK_MODEL": "ResNet50", "INFERSTACK_WEIGHTS": path,
                                      "INFERSTACK_BATCH_SIZE": "4",
                                      "INFERSTACK_PRECISION": "fp32"})


def test_resnet50_served_equals_in_process_with_imagenet_labels(stack, resnet_weights, photos):
    import keras

    from inferstack_worker.model import imagenet_labels

    _, model = resnet_weights
    labels = imagenet_labels()
    assert len(labels) == 1000 and labels[281] == "tabby" and labels[0] == "tench"
    outputs = []
    for name, upload in photos.items():
        x = decode_image(upload, (224, 224)).astype(np.float32)[None]
        direct = np.asarray(model(keras.applications.resnet50.preprocess_input(x), training=False))[0]
        r = requests.post(stack.url + "/predict", files={"image": (name, upload)}, params={"top_k": 1000},
                          timeout=120)
        assert r.status_code == 200, r.text
        served = r.json()["predictions"]
        assert len(served) == 1000
        by_label = {}
        for p in served:
            by_label.setdefault(p["label"], []).append(p["probability"])
        # The i-th model output carries the i-th ImageNet label (duplicated names hold two values).
        for idx in np.argsort(-direct)[:20]:
            assert min(abs(v - direct[idx]) for v in by_label[labels[idx]]) < 1e-4
        assert served[0]["label"] == labels[int(np.argmax(direct))]
        assert served[0]["probability"] == pytest.approx(float(direct.max()), abs=1e-4)
        outputs.append(direct)
    # The comparison above is only informative if outputs depend on the photo by more than the tolerance.
    spread = max(float(np.abs(a - b).max()) for a in outputs for b in outputs)
    assert spread > 1e-3
