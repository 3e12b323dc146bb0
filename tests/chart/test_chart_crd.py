"""The chart ships the operator's CRD unchanged, and it is a valid v1 CRD with the public names."""

from __future__ import annotations

import kubernetes_validate
import yaml

from .conftest import CHART, CHART_CRD, OPERATOR_CRD

KUBE_VERSION = "1.31.0"


def test_chart_crd_is_the_operator_crd_byte_for_byte() -> None:
    assert OPERATOR_CRD.read_bytes() == CHART_CRD.read_bytes(), (
        f"{CHART_CRD.relative_to(CHART.parent.parent)} drifted from the operator's CRD: run `make chart-crd`"
    )


def test_crds_dir_holds_only_that_crd() -> None:
    assert [p.name for p in (CHART / "crds").iterdir()] == [CHART_CRD.name]


def test_crd_is_valid_for_kubernetes() -> None:
    crd = yaml.safe_load(CHART_CRD.read_text())
    kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)


def test_crd_public_names() -> None:
    crd = yaml.safe_load(CHART_CRD.read_text())
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "inferenceservices.inferstack.dev"
    assert spec["group"] == "inferstack.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "InferenceService"
    assert spec["names"]["plural"] == "inferenceservices"
    assert spec["names"]["singular"] == "inferenceservice"
    assert "infsvc" in spec["names"]["shortNames"]
    (version,) = [v for v in spec["versions"] if v["storage"]]
    assert version["name"] == "v1alpha1" and version["served"]
    assert version["subresources"]["status"] == {}
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"]]
    assert columns == ["READY", "WEB", "WORKERS", "MODEL", "URL", "AGE"]
