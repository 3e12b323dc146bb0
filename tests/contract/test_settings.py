"""The one settings table: Settings, from_env, the CRD, the operator's spec defaults and the docs agree with it."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from inferstack.contract.settings import SETTINGS, ConfigError, Settings, markdown_table
from inferstack_operator import spec

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "operator" / "inferstack_operator" / "crd.yaml"
# Where resolve() keeps each CRD field that is also a process setting.
RESOLVED_FIELD = {"model": "model_name"}


def crd_default(path: str) -> object:
    """The default the CRD's schema gives ``spec.a.b`` (KeyError when it gives none)."""
    schema = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    node = schema
    for part in path.split("."):
        node = node["properties"][part]
    return node["default"]


def test_settings_fields_and_defaults_are_the_table():
    assert [f.name for f in fields(Settings)] == [s.field for s in SETTINGS]
    plain = Settings(model_name="x")
    for setting in SETTINGS:
        if setting.field != "model_name":  # derived from the model when empty
            assert getattr(plain, setting.field) == setting.default, setting.env
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)


def test_from_env_reads_every_variable_of_the_table():
    values = {"int": "7", "float": "7.5", "str": "seven", "optional": "/seven"}
    env = {s.env: (s.choices[-1] if s.kind == "choice" else values[s.kind]) for s in SETTINGS}
    env["INFERSTACK_MAX_DECODE_BYTES"] = str(2 << 20)  # its lower bound is 1 MiB
    env["INFERSTACK_AUTO_INT8"] = "1"  # a switch: 0 or 1
    settings = Settings.from_env(env)
    for setting in SETTINGS:
        assert getattr(settings, setting.field) == setting.read(env), setting.env
        assert getattr(settings, setting.field) != setting.default, f"{setting.env} was not read"


@pytest.mark.parametrize("env, message", [
    ({"INFERSTACK_BATCH_SIZE": "0"}, "INFERSTACK_BATCH_SIZE must be between 1 and 1024, got 0"),
    ({"INFERSTACK_PORT": "http"}, "INFERSTACK_PORT must be an integer, got 'http'"),
    ({"INFERSTACK_REQUEST_TIMEOUT_S": "0"}, "INFERSTACK_REQUEST_TIMEOUT_S must be >= 0.1, got 0.0"),
    ({"INFERSTACK_RUNTIME": "tpu"}, "INFERSTACK_RUNTIME must be one of auto, keras, openvino, got 'tpu'"),
])
def test_bad_values_are_refused_with_the_variable_named(env, message):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert str(info.value) == message


def test_crd_defaults_are_the_table_defaults():
    checked = [s for s in SETTINGS if s.crd]
    assert len(checked) >= 8
    for setting in checked:
        assert crd_default(setting.crd) == setting.default, setting.crd


def test_operator_spec_defaults_are_the_table_defaults():
    resolved = spec.resolve("demo", "ml", {})
    for setting in SETTINGS:
        if setting.crd:
            assert getattr(resolved, RESOLVED_FIELD.get(setting.field, setting.field)) == setting.default, setting.crd


def test_docs_configuration_table_is_the_table():
    text = (REPO / "docs" / "configuration.md").read_text()
    found = re.search(r"<!-- settings table: generated, keep in sync -->\n(.*?)<!-- end settings table -->", text, re.S)
    assert found, "docs/configuration.md lost its generated settings table"
    assert found.group(1) == markdown_table(), "regenerate with: python -m inferstack.contract.settings"
