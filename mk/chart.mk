# The Helm chart and the Helm test venv. Included by the Makefile (images: mk/images.mk).
#
#   make chart          copy the operator's CRD into the chart, lint it, package it into dist/
#   make lint-chart     helm lint (helm-sdkpy, embedded Helm v4)
#   .venv-helm/.stamp   the Python 3.12 venv with helm-sdkpy that tests/chart/ drives

# The Makefile's `test` target depends on $(HELM_VENV_STAMP).
HELM_VENV_STAMP := .venv-helm/.stamp
# pyenv's 3.12 (asked of pyenv when it is on PATH, else looked for under ~/.pyenv), else python3.12.
PYTHON312 ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.12*/bin/python \
	$(HOME)/.pyenv/versions/3.12*/bin/python) $(shell command -v python3.12 2>/dev/null))
HELM_VENV := .venv-helm
HELM_SDKPY_VERSION ?= 0.1.32
HELM_PY := $(HELM_VENV)/bin/python
HELM_DRIVER := tools/helm_driver.py

CHART_DIR := charts/inferstack
CHART_CRD := $(CHART_DIR)/crds/inferenceservices.inferstack.dev.yaml
OPERATOR_CRD := operator/inferstack_operator/crd.yaml

.PHONY: chart chart-crd lint-chart

lint: lint-chart

# helm-sdkpy needs Python >= 3.12; the project venv may be older, hence a venv of its own.
$(HELM_VENV_STAMP):
	@test -x "$(PYTHON312)" || { echo "Python 3.12 not found at '$(PYTHON312)'; pass PYTHON312=/path/to/python3.12" >&2; exit 1; }
	$(PYTHON312) -m venv $(HELM_VENV)
	$(HELM_VENV)/bin/pip install --quiet --disable-pip-version-check 'helm-sdkpy==$(HELM_SDKPY_VERSION)'
	touch $@

# The CRD has one source, the operator's; the chart ships a copy that a test keeps byte-equal.
$(CHART_CRD): $(OPERATOR_CRD)
	cp $< $@

chart-crd: $(CHART_CRD)

chart: $(CHART_CRD) lint-chart
	$(HELM_PY) $(HELM_DRIVER) package $(CHART_DIR) dist

lint-chart: $(CHART_CRD) $(HELM_VENV_STAMP)
	$(HELM_PY) $(HELM_DRIVER) lint $(CHART_DIR)
