# Container images, the Helm chart and the Helm test venv. Included by the Makefile.
#
#   make images         build the web, worker, worker-gpu and operator images (needs Docker)
#   make chart          copy the operator's CRD into the chart, lint it, package it into dist/
#   make lint-images    hadolint every Dockerfile
#   make lint-chart     helm lint (helm-sdkpy, embedded Helm v4)
#   .venv-helm/.stamp   the Python 3.12 venv with helm-sdkpy that tests/chart/ drives

# The Makefile's `test` target depends on $(HELM_VENV_STAMP).
HELM_VENV_STAMP := .venv-helm/.stamp
PYTHON312 ?= $(shell pyenv root 2>/dev/null)/versions/3.12.1/bin/python
HELM_VENV := .venv-helm
HELM_SDKPY_VERSION ?= 0.1.32
HELM_PY := $(HELM_VENV)/bin/python
HELM_DRIVER := tests/chart/helm_driver.py
HADOLINT ?= $(BIN)/hadolint
DOCKER ?= docker

CHART_DIR := charts/inferstack
CHART_CRD := $(CHART_DIR)/crds/inferenceservices.inferstack.dev.yaml
OPERATOR_CRD := operator/inferstack_operator/crd.yaml

# The chart's values.yaml defaults: ghcr.io/inferstack/<name>:<appVersion>.
IMAGE_REGISTRY ?= ghcr.io/inferstack
IMAGE_TAG ?= $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' $(CHART_DIR)/Chart.yaml)
DOCKERFILES := images/web/Dockerfile images/worker/Dockerfile images/worker/Dockerfile.gpu operator/Dockerfile

.PHONY: docker-check images image-web image-worker image-worker-gpu image-operator chart chart-crd lint-images lint-chart

lint: lint-images lint-chart

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

lint-images: venv
	$(HADOLINT) $(DOCKERFILES)

# Build context is the repo root (see .dockerignore). BuildKit is required (RUN --mount).
images: image-web image-worker image-worker-gpu image-operator

docker-check:
	@$(DOCKER) info >/dev/null 2>&1 || { echo "no Docker engine reachable with '$(DOCKER)': building images needs one" >&2; exit 1; }

image-web: docker-check
	DOCKER_BUILDKIT=1 $(DOCKER) build -f images/web/Dockerfile -t $(IMAGE_REGISTRY)/web:$(IMAGE_TAG) .

image-worker: docker-check
	DOCKER_BUILDKIT=1 $(DOCKER) build -f images/worker/Dockerfile -t $(IMAGE_REGISTRY)/worker:$(IMAGE_TAG) .

image-worker-gpu: docker-check
	DOCKER_BUILDKIT=1 $(DOCKER) build -f images/worker/Dockerfile.gpu -t $(IMAGE_REGISTRY)/worker-gpu:$(IMAGE_TAG) .

image-operator: docker-check
	DOCKER_BUILDKIT=1 $(DOCKER) build -f operator/Dockerfile -t $(IMAGE_REGISTRY)/operator:$(IMAGE_TAG) .
