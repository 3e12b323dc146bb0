"""Paths for the operator's unit tests. Its end-to-end tests run on a real control plane: tests/cluster/."""

from __future__ import annotations

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "operator" / "inferstack_operator" / "crd.yaml"
EXAMPLES = REPO / "operator" / "examples"
