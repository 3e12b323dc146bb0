"""`helm lint` and values.schema.json, through helm-sdkpy's embedded Helm v4."""

from __future__ import annotations

import shutil

import pytest
import yaml

from tests.kubeplane import Kube, helm

from .conftest import BAD_VALUES, CHART, TEMPLATE_FAILURES

WARNING = 2  # Helm's support.WarningSev; ERROR is 3


def test_helm_lint_passes(helm_report: dict) -> None:
    (lint,) = helm_report["lint"]
    assert "error" not in lint, lint
    result = lint["result"]
    assert result["TotalChartsLinted"] == 1
    assert not result["Errors"]
    assert [m for m in result["Messages"] or [] if m["Severity"] >= WARNING] == []


def test_helm_lint_fails_on_bad_default_values(control_plane: Kube, tmp_path) -> None:
    # Lint checks the chart's own values.yaml against the schema: break it in copies.
    charts = []
    for name, patch in {"string-replicas": {"replicaCount": "1"},
                        "bad-policy": {"image": {"pullPolicy": "Sometimes"}}}.items():
        copy = tmp_path / name / "inferstack"
        shutil.copytree(CHART, copy)
        values = yaml.safe_load((copy / "values.yaml").read_text())
        for key, val in patch.items():
            values[key] = {**values[key], **val} if isinstance(val, dict) else val
        (copy / "values.yaml").write_text(yaml.safe_dump(values))
        charts.append(str(copy))
    report = helm({"lint": charts}, control_plane, tmp_path)
    for lint in report["lint"]:
        result = lint.get("result") or {}
        severities = [m["Severity"] for m in result.get("Messages") or []]
        assert "error" in lint or result.get("Errors") or max(severities, default=0) > WARNING, lint


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(helm_report: dict, name: str) -> None:
    case = helm_report["cases"][f"bad:{name}"]
    _, fragment = BAD_VALUES[name]
    assert case["error"], f"helm accepted bad values {name}"
    assert "values don't meet the specifications of the schema" in case["error"], case["error"]
    assert fragment in case["error"], case["error"]
    assert not case["manifest"]  # rejected before any object was sent


@pytest.mark.parametrize("name", sorted(TEMPLATE_FAILURES))
def test_templates_refuse_inconsistent_values(helm_report: dict, name: str) -> None:
    case = helm_report["cases"][f"fail:{name}"]
    assert case["error"] and TEMPLATE_FAILURES[name][1] in case["error"], case["error"]
