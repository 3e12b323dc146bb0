"""Both HTTP APIs fuzzed by schemathesis from the served /openapi.json, against the real stack:
every answer is JSON (or the documented media type) with a documented status, and never a 500."""

from __future__ import annotations

import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from inferstack.config import Settings
from inferstack_web.openapi import document
from tests.helpers import V2_BOMBS, digits_env

# Bounded so the whole run stays around a minute on a shared 2-core machine.
EXAMPLES = 20


MODEL_FILE = "digits.keras"  # the saved model's file name: model name "digits"


@pytest.fixture(scope="module")
def stack(make_stack, digits_model):
    return make_stack(workers=1, env=digits_env(digits_model, INFERSTACK_MAX_IMAGE_BYTES="100000",
                                                 INFERSTACK_REQUEST_TIMEOUT_S="20"))


def test_served_document_is_the_one_fuzzed(stack):
    served = requests.get(stack.url + "/openapi.json", timeout=10).json()
    assert served == json.loads(json.dumps(document(Settings(model=MODEL_FILE, max_image_bytes=100_000))))


# Built from the same code the server runs (schemathesis' lazy fixture loader does not work with
# the pytest in use); the test above proves the server serves exactly this document.
schema = schemathesis.openapi.from_dict(document(Settings(model=MODEL_FILE, max_image_bytes=100_000)))


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_openapi_document(case, stack):
    case.call_and_validate(
        base_url=stack.url,
        timeout=60,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                response_schema_conformance, response_headers_conformance],
    )


@pytest.mark.parametrize("body", [body for body, _ in V2_BOMBS])
def test_v2_parser_bombs_are_answered_as_documented(stack, body):
    # Hand-made bodies schemathesis would not generate: each answered 400 JSON, as the document says.
    case = schema["/v2/models/{model}/infer"]["POST"].Case(path_parameters={"model": "digits"})
    resp = requests.post(f"{stack.url}/v2/models/digits/infer", data=body, timeout=30,
                         headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text[:300]
    case.validate_response(resp, checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                         response_schema_conformance])
