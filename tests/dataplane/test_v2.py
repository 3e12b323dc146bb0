"""The Open Inference Protocol (v2) end to end, spoken by tritonclient.http (the PyPI client Triton
users have), against real gunicorn, real workers and real Redis; and /predict's several-image and
JSON forms, which share the same path."""

from __future__ import annotations

import base64
import gzip
import json
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from inferstack.config import Settings
from inferstack.imaging import decode_image
from inferstack.protocol import WebQueue, decode_probabilities
from tests.helpers import DIGIT_LABELS, DIGIT_SIZE, V2_BOMBS, digits_env, jpeg_bytes, png_bytes

MAX_BYTES = 200_000
MODEL = "digits"  # INFERSTACK_MODEL=.../digits.keras: the file stem


@pytest.fixture(scope="module")
def stack(make_stack, digits_model):
    return make_stack(workers=1, env=digits_env(digits_model, INFERSTACK_MAX_IMAGE_BYTES=str(MAX_BYTES)))


@pytest.fixture(scope="module")
def triton(stack):
    client = httpclient.InferenceServerClient(stack.url.removeprefix("http://"), network_timeout=60.0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def uploads(digits_model) -> list[bytes]:
    return [png_bytes(digits_model["x_test"][0]), jpeg_bytes(digits_model["x_test"][1], quality=95)]


def bytes_input(images: list[bytes], binary: bool) -> httpclient.InferInput:
    inp = httpclient.InferInput("image", [len(images)], "BYTES")
    if binary:
        inp.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    else:
        # The KServe convention for images in JSON: each element is the file, base64-encoded.
        inp.set_data_from_numpy(np.array([base64.b64encode(i) for i in images], dtype=np.object_), binary_data=False)
    return inp


def test_model_name_defaults_to_architecture_or_file_stem():
    assert Settings.from_env({}).model_name == "resnet50"
    assert Settings.from_env({"INFERSTACK_MODEL": "EfficientNetB0"}).model_name == "efficientnetb0"
    assert Settings.from_env({"INFERSTACK_MODEL": "/models/Flowers.keras"}).model_name == "flowers"
    assert Settings.from_env({"INFERSTACK_MODEL": "x.keras", "INFERSTACK_MODEL_NAME": "cats"}).model_name == "cats"


def test_health_and_metadata_through_tritonclient(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready(MODEL)
    assert triton.is_model_ready(MODEL, model_version="1")
    assert not triton.is_model_ready("nope")
    server = triton.get_server_metadata()
    assert server["name"] == "inferstack"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    meta = triton.get_model_metadata(MODEL)
    assert meta["name"] == MODEL
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(DIGIT_LABELS)]}]


def test_binary_batch_of_two_with_probabilities_and_classification(triton, uploads, in_process):
    expected = np.stack([in_process(u) for u in uploads])
    res = triton.infer(MODEL, [bytes_input(uploads, binary=True)],
                       outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=True)])
    probs = res.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (2, len(DIGIT_LABELS))
    np.testing.assert_allclose(probs, expected, atol=1e-5)  # in order: image i -> row i

    res = triton.infer(MODEL, [bytes_input(uploads, binary=True)],
                       outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=True, class_count=3)])
    classes = res.as_numpy("probabilities")
    assert classes.shape == (2, 3)
    for row, want in zip(classes, expected):
        top = np.argsort(-want, kind="stable")[:3]
        parsed = [s.decode().split(":") for s in row]
        assert [int(p[1]) for p in parsed] == list(top)
        assert [p[2] for p in parsed] == [DIGIT_LABELS[i] for i in top]
        np.testing.assert_allclose([float(p[0]) for p in parsed], want[top], atol=1e-5)


def test_json_base64_infer(triton, uploads, in_process):
    res = triton.infer(
        MODEL, [bytes_input(uploads, binary=False)],
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False)],
        request_id="req-7",
    )
    body = res.get_response()
    assert body["model_name"] == MODEL and body["id"] == "req-7"
    assert body["outputs"][0]["datatype"] == "FP32" and body["outputs"][0]["shape"] == [2, len(DIGIT_LABELS)]
    np.testing.assert_allclose(res.as_numpy("probabilities"), np.stack([in_process(u) for u in uploads]), atol=1e-5)


def test_json_classification_strings_as_triton_formats_them(stack, uploads):
    body = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "data": [base64.b64encode(uploads[0]).decode()]}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
    }
    r = requests.post(f"{stack.url}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [1, 2]
    for s in out["data"]:
        prob, index, label = s.split(":")
        assert float(prob) >= 0 and label == DIGIT_LABELS[int(index)]


def test_no_outputs_and_gzip_request_gives_binary_probabilities(stack, uploads):
    # What tritonclient sends with outputs=None and request_compression_algorithm="gzip".
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                    "parameters": {"binary_data_size": 4 + len(uploads[0])}}],
                       "parameters": {"binary_data_output": True}}).encode()
    body = gzip.compress(head + struct.pack("<I", len(uploads[0])) + uploads[0])
    r = requests.post(f"{stack.url}/v2/models/{MODEL}/infer", data=body, timeout=60,
                      headers={"Inference-Header-Content-Length": str(len(head)), "Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    out = json.loads(r.content[:n])["outputs"][0]
    assert out["parameters"]["binary_data_size"] == 4 * len(DIGIT_LABELS) == len(r.content) - n
    probs = np.frombuffer(r.content[n:], dtype="<f4")
    assert abs(float(probs.sum()) - 1.0) < 1e-4


def test_v2_results_equal_predict_results(stack, triton, photos, uploads):
    for upload in [*uploads, photos["chelsea.jpg"]]:
        predicted = requests.post(stack.url + "/predict", files={"image": ("x", upload)},
                                  params={"top_k": 10}, timeout=60).json()["predictions"]
        res = triton.infer(MODEL, [bytes_input([upload], binary=True)],
                           outputs=[httpclient.InferRequestedOutput("probabilities", class_count=10)])
        v2 = [s.decode().split(":") for s in res.as_numpy("probabilities")[0]]
        assert [label for _, _, label in v2] == [p["label"] for p in predicted]
        np.testing.assert_allclose([float(p) for p, _, _ in v2], [p["probability"] for p in predicted], atol=2e-6)
        probs = triton.infer(MODEL, [bytes_input([upload], binary=True)]).as_numpy("probabilities")[0]
        np.testing.assert_allclose(sorted(probs, reverse=True), [p["probability"] for p in predicted], atol=1e-6)


def test_corrupt_image_is_400_with_error_and_service_stays_healthy(stack, triton, uploads):
    corrupt = uploads[0][: len(uploads[0]) // 2]
    with pytest.raises(InferenceServerException) as info:
        triton.infer(MODEL, [bytes_input([uploads[1], corrupt], binary=True)])
    assert info.value.status() == "400"
    assert "Image 2 of 2" in info.value.message()
    r = requests.post(f"{stack.url}/v2/models/{MODEL}/infer", timeout=30, json={
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(b"junk").decode()]}]})
    assert r.status_code == 400 and list(r.json()) == ["error"]
    assert triton.infer(MODEL, [bytes_input(uploads[:1], binary=True)]).as_numpy("probabilities").shape == (1, 10)


def test_unknown_model_is_404(stack, triton, uploads):
    for call in (lambda: triton.get_model_metadata("nope"),
                 lambda: triton.infer("nope", [bytes_input(uploads[:1], binary=True)]),
                 lambda: triton.get_model_metadata(MODEL, model_version="2")):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "404"
    r = requests.get(stack.url + "/v2/models/nope/ready", timeout=10)
    assert r.status_code == 404 and list(r.json()) == ["error"]


BINARY_HEAD = b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 7}}]}'


@pytest.mark.parametrize(
    "body, header_length, fragment",
    [
        (b"not json", None, "not a JSON inference request"),
        (b'{"inputs": []}', None, "exactly one input"),
        (b'{"inputs": [{"name": "pixels", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}]}', None,
         "Unknown input"),
        (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]}', None, "datatype BYTES"),
        (b'{"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}]}', None, "2 elements"),
        (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["@@@"]}]}', None, "base64"),
        # An element announcing 5 bytes where only 3 follow.
        (BINARY_HEAD + b"\x05\x00\x00\x00abc", str(len(BINARY_HEAD)), "ends inside an element"),
        (BINARY_HEAD + b"\x05\x00\x00\x00abcdefgh", str(len(BINARY_HEAD)), "does not match"),
        (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}], '
         b'"outputs": [{"name": "logits"}]}', None, "Unknown output"),
        (b"{}", "999", "Inference-Header-Content-Length"),
        (b"[" * 100_000, None, "not a JSON inference request"),
        *[(body, None, fragment) for body, fragment in V2_BOMBS],
    ],
)
def test_malformed_infer_requests_are_400_json(stack, body, header_length, fragment):
    headers = {"Inference-Header-Content-Length": header_length} if header_length else {}
    r = requests.post(f"{stack.url}/v2/models/{MODEL}/infer", data=body, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    assert list(r.json()) == ["error"] and fragment in r.json()["error"]


def test_binary_elements_beyond_the_shape_are_400(stack):
    # 50,000 empty elements announced as one: refused at the second, not split into a list first.
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 4 * 50_000}}]}).encode()
    r = requests.post(f"{stack.url}/v2/models/{MODEL}/infer", data=head + b"\0" * (4 * 50_000), timeout=30,
                      headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400 and "carries 2" in r.json()["error"], r.text


def test_over_size_limit_is_413(stack):
    noise = png_bytes(np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8))  # ~68 KB
    images = [noise] * (MAX_BYTES // len(noise) + 1)
    body = {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                        "data": [base64.b64encode(i).decode() for i in images]}]}
    r = requests.post(f"{stack.url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert r.status_code == 413 and list(r.json()) == ["error"]


def test_predict_several_images_answers_results_in_order(stack, digits_model):
    images = [png_bytes(digits_model["x_test"][i]) for i in range(5)]
    singles = [requests.post(stack.url + "/predict", files={"image": ("x.png", i)}, timeout=60).json()
               for i in images]
    r = requests.post(stack.url + "/predict", files=[("image", (f"{n}.png", i)) for n, i in enumerate(images)],
                      timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and "predictions" not in body
    assert [res["predictions"][0]["label"] for res in body["results"]] == \
        [s["predictions"][0]["label"] for s in singles]
    for res, single in zip(body["results"], singles):
        np.testing.assert_allclose([p["probability"] for p in res["predictions"]],
                                   [p["probability"] for p in single["predictions"]], atol=1e-6)


def test_predict_json_body_answers_like_multipart(stack, digits_model):
    upload = png_bytes(digits_model["x_test"][3])
    multipart = requests.post(stack.url + "/predict", files={"image": ("x.png", upload)}, timeout=60).json()
    as_json = requests.post(stack.url + "/predict", json={"image": base64.b64encode(upload).decode()},
                            params={"top_k": 5}, timeout=60).json()
    assert set(as_json) == set(multipart) == {"success", "predictions", "model"}
    assert [p["label"] for p in as_json["predictions"]] == [p["label"] for p in multipart["predictions"]]
    several = requests.post(stack.url + "/predict", json={"image": [base64.b64encode(upload).decode()] * 2},
                            timeout=60).json()
    assert len(several["results"]) == 2
    bad = requests.post(stack.url + "/predict", json={"picture": "x"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["success"] is False


def test_v2_queue_full_503_timeout_504_and_model_not_ready_without_workers(make_stack, digits_model):
    stack = make_stack(
        workers=0,
        env=digits_env(digits_model, INFERSTACK_MAX_QUEUE="2", INFERSTACK_REQUEST_TIMEOUT_S="3",
                       INFERSTACK_WEB_PROCESSES="1"),
        wait=False,
    )
    stack.wait_ready(timeout_s=60, workers=0)  # web and Redis up; no worker needed
    assert requests.get(stack.url + "/v2/health/ready", timeout=5).status_code == 200  # can queue work
    not_ready = requests.get(f"{stack.url}/v2/models/{MODEL}/ready", timeout=5)
    assert not_ready.status_code == 503 and list(not_ready.json()) == ["error"]

    def infer(n: int) -> requests.Response:
        data = [base64.b64encode(png_bytes(digits_model["x_test"][0])).decode()] * n
        return requests.post(f"{stack.url}/v2/models/{MODEL}/infer", timeout=30, json={
            "inputs": [{"name": "image", "shape": [n], "datatype": "BYTES", "data": data}]})

    r = redis.Redis.from_url(stack.env["INFERSTACK_REDIS_URL"])
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(infer, 2)  # fills the queue, then waits for workers that never come
        while r.xlen("inferstack:requests") < 2:
            time.sleep(0.01)
        full = infer(1)
        assert full.status_code == 503 and full.headers["Retry-After"] == "1"
        assert list(full.json()) == ["error"] and "queue full" in full.json()["error"]
        timed_out = waiting.result()
    assert timed_out.status_code == 504 and list(timed_out.json()) == ["error"]


def test_worker_sends_the_full_vector_only_when_asked(stack, uploads):
    # /predict stays as cheap as before: its replies carry the top k only.
    queue = WebQueue(stack.env["INFERSTACK_REDIS_URL"], "inferstack", max_queue=100, timeout_s=30)
    pixels = decode_image(uploads[0], (DIGIT_SIZE, DIGIT_SIZE))
    plain = queue.wait(queue.submit(pixels, 3))
    full = queue.wait(queue.submit(pixels, 3, probabilities=True))
    assert "probabilities" not in plain and len(plain["predictions"]) == 3
    probs = decode_probabilities(full["probabilities"])
    assert probs.dtype == np.float32 and probs.shape == (len(DIGIT_LABELS),)
    assert [p["probability"] for p in full["predictions"]] == sorted(probs.tolist(), reverse=True)[:3]
