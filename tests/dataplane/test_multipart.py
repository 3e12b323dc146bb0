"""The in-memory multipart reader (inferstack_web.multipart) against werkzeug's parser: for every
body it reads, the same files; every body it cannot vouch for goes to werkzeug (None)."""

from __future__ import annotations

import io
import random

import pytest
from inferstack_web.multipart import Limits, form_files
from urllib3 import encode_multipart_formdata
from werkzeug.formparser import parse_form_data

from tests.helpers import png_bytes

LIMITS = Limits(max_parts=1000, max_field_bytes=500_000)
# Bytes that make multipart framing hard: line breaks, dashes, the boundary's own start.
TRICKY = [b"\r\n", b"\n", b"\r", b"--", b"\r\n--", b"--x", b"\r\n\r\n", b"Content-Disposition: ", b"\x00", b"\xff"]


def werkzeug_files(body: bytes, content_type: str, name: str = "image") -> list[bytes]:
    """What Flask's request.files.getlist(name) would read from this body."""
    environ = {"REQUEST_METHOD": "POST", "CONTENT_TYPE": content_type, "CONTENT_LENGTH": str(len(body)),
               "wsgi.input": io.BytesIO(body)}
    _, _, files = parse_form_data(environ, max_form_parts=LIMITS.max_parts,
                                  max_form_memory_size=LIMITS.max_field_bytes)
    return [f.stream.read() for f in files.getlist(name)]


def boundary_of(content_type: str) -> str:
    return content_type.split("boundary=", 1)[1].strip('"')


def random_content(rng: random.Random) -> bytes:
    pieces = [rng.choice(TRICKY) if rng.random() < 0.3 else rng.randbytes(rng.randint(0, 40))
              for _ in range(rng.randint(0, 12))]
    return b"".join(pieces)


def random_form(rng: random.Random) -> list[tuple[str, object]]:
    fields: list[tuple[str, object]] = []
    for _ in range(rng.randint(1, 5)):
        name = rng.choice(["image", "image", "other", "top_k"])
        if rng.random() < 0.7:
            fields.append((name, (rng.choice(["a.jpg", "b c.png", "é.png", ""]), random_content(rng), "image/png")))
        else:
            fields.append((name, random_content(rng).decode("latin-1")))
    return fields


@pytest.mark.parametrize("seed", range(300))
def test_plain_bodies_give_werkzeugs_files(seed: int) -> None:
    rng = random.Random(seed)
    body, content_type = encode_multipart_formdata(random_form(rng), boundary=rng.choice([None, "b-o-u-n-d"]))
    ours = form_files(body, boundary_of(content_type), "image", LIMITS)
    assert ours is not None, "urllib3's (requests') bodies are the plain shape: no fallback"
    assert ours == werkzeug_files(body, content_type)


def _mutations(body: bytes, boundary: bytes, rng: random.Random) -> list[bytes]:
    delimiter = b"\r\n--" + boundary
    return [
        b"preamble\r\n" + body,                                      # text before the first delimiter
        body.replace(delimiter, b"\n--" + boundary),                 # bare LF line breaks
        body.replace(b"--" + boundary + b"\r\n", b"--" + boundary + b"  \r\n"),  # spaces after a delimiter
        body.replace(b"\r\nContent-Type", b"\r\n\tContent-Type"),     # a folded header line
        body[: rng.randint(0, len(body))],                           # truncated anywhere
        body[:-len(b"--\r\n") - len(boundary) - 2],                  # no close delimiter
        body.replace(b"\r\n\r\n", b"\r\n\r\n--" + boundary + b"\r\n", 1),  # the boundary inside a part
        body.replace(b"form-data", b"form-data\r\nX-Bad", 1),        # a header line with no colon
        body.replace(b"Content-Disposition", b"Content-Dispositio", 1),  # werkzeug refuses the whole form
        bytes(b ^ (rng.random() < 0.02) for b in body),              # a few flipped bits
        _inserted(body, rng),                                        # framing bytes anywhere
    ]


def _inserted(body: bytes, rng: random.Random) -> bytes:
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(body))
        body = body[:at] + rng.choice(TRICKY + [b"--bnd", b"\r\n--bnd", b"\r\n--bnd--"]) + body[at:]
    return body


@pytest.mark.parametrize("seed", range(400))
def test_other_bodies_give_werkzeugs_files_or_go_to_werkzeug(seed: int) -> None:
    rng = random.Random(seed)
    body, content_type = encode_multipart_formdata(random_form(rng), boundary="bnd")
    for mutated in _mutations(body, b"bnd", rng):
        ours = form_files(mutated, "bnd", "image", LIMITS)
        if ours is not None:
            assert ours == werkzeug_files(mutated, content_type)


@pytest.mark.parametrize("mutate", ["preamble", "bare LF", "spaces", "folded", "no close", "boundary inside",
                                    "no colon", "no disposition"])
def test_shapes_werkzeug_reads_differently_are_left_to_it(mutate: str) -> None:
    body, _ = encode_multipart_formdata([("image", ("a.png", b"\x89PNG data", "image/png"))], boundary="bnd")
    mutated = dict(zip(["preamble", "bare LF", "spaces", "folded", "truncated", "no close", "boundary inside",
                        "no colon", "no disposition"],
                       _mutations(body, b"bnd", random.Random(0))))[mutate]
    assert form_files(mutated, "bnd", "image", LIMITS) is None


def test_werkzeugs_limits_go_to_werkzeug_which_enforces_them() -> None:
    many, _ = encode_multipart_formdata([("f", "x")] * 5 + [("image", ("a.png", b"data", "image/png"))], boundary="b")
    assert form_files(many, "b", "image", Limits(max_parts=6, max_field_bytes=None)) == [b"data"]
    assert form_files(many, "b", "image", Limits(max_parts=5, max_field_bytes=None)) is None
    big_field, _ = encode_multipart_formdata([("note", "x" * 100), ("image", ("a.png", b"d", "image/png"))],
                                             boundary="b")
    assert form_files(big_field, "b", "image", Limits(max_parts=None, max_field_bytes=99)) is None
    assert form_files(big_field, "b", "image", Limits(max_parts=None, max_field_bytes=100)) == [b"d"]


def test_a_field_named_image_without_a_filename_is_not_a_file() -> None:
    body, content_type = encode_multipart_formdata([("image", "just text")], boundary="b")
    assert form_files(body, "b", "image", LIMITS) == [] == werkzeug_files(body, content_type)


def test_predict_answers_plain_and_fallback_bodies_alike(stack_for_multipart, digits_model) -> None:
    import requests

    upload = png_bytes(digits_model["x_test"][3])
    body, content_type = encode_multipart_formdata([("image", ("d.png", upload, "image/png"))], boundary="bnd")
    url = stack_for_multipart.url + "/predict"
    answers = []
    for data in (body, b"a preamble werkzeug skips\r\n" + body):  # the second is werkzeug's to parse
        r = requests.post(url, data=data, headers={"Content-Type": content_type}, timeout=30)
        assert r.status_code == 200, r.text
        answers.append(r.json()["predictions"])
    assert answers[0] == answers[1]
    two, content_type = encode_multipart_formdata([("image", ("d.png", upload, "image/png"))] * 2, boundary="bnd")
    r = requests.post(url, data=two, headers={"Content-Type": content_type}, timeout=30)
    assert r.status_code == 200 and [x["predictions"] for x in r.json()["results"]] == answers


@pytest.fixture(scope="module")
def stack_for_multipart(make_stack, digits_model):
    from tests.helpers import digits_env

    return make_stack(workers=1, env=digits_env(digits_model))
