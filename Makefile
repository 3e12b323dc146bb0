# inferstack: `make run` serves the stack locally, `make test` runs the test suite.
# Everything runs from a virtualenv in .venv/, created on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKERS ?= 1
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

# Component fragments (operator, chart, load test) add targets and prerequisites.
-include mk/*.mk
.PHONY: help venv redis java run test test-fast loadtest bench bench-tax bench-peers bench-batch lint lint-imports images chart clean

help:
	@echo "make run        redis + $(WORKERS) worker(s) + gunicorn on http://127.0.0.1:5000 (WORKERS=N)"
	@echo "make test       the pytest suite (real redis-server, gunicorn, workers, a real Kubernetes control plane)"
	@echo "make cluster    a local Kubernetes control plane in the foreground (.cluster/kubeconfig)"
	@echo "make loadtest   locust, headless, against the local stack (or HOST=...)"
	@echo "make bench      served vs raw throughput and latency, JSON + PNG under bench/results/"
	@echo "make bench-tax  the serving tax: worker fed from Redis vs raw, web CPU per image, JSON under bench/results/"
	@echo "make bench-peers  ours vs Ray Serve, LitServe and mosec on the same OpenVINO IR (own venv), JSON under bench/results/"
	@echo "make bench-batch  inferstack batch (Spark) vs raw model vs inferstack classify, JSON under bench/results/"
	@echo "make lint       hadolint on the Dockerfiles, helm lint on the chart, import layers (lint-imports)"
	@echo "make images     docker build of web, worker (CPU, GPU) and operator images"
	@echo "make chart      sync the CRD into the chart and package it"

$(BIN)/.stamp: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(BIN)/.stamp

# Tests and `make run` need redis-server; Debian's package is the one we test with.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server from Debian"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

# PySpark (`inferstack batch` and its tests) needs a Java 17+ runtime; Debian's default JRE is one.
# java: mk/finetune.mk (PySpark needs a Java runtime; inferstack batch and finetune share it).

run: venv redis
	$(BIN)/python -m tools.devstack --workers $(WORKERS)

test: venv redis java $(HELM_VENV_STAMP) cluster-bin
	$(BIN)/python -m pytest $(PYTEST_ARGS)

loadtest: venv redis
	$(BIN)/python loadtest/run.py

bench: venv redis
	$(BIN)/python bench/bench.py

bench-tax: venv redis
	$(BIN)/python bench/serving_tax.py

# The peers get their own environment: they are measured, not shipped.
PEERS_VENV := bench/peer_servers/.venv
$(PEERS_VENV)/.stamp: bench/peer_servers/requirements.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q -r bench/peer_servers/requirements.txt
	touch $@

bench-peers: venv redis $(PEERS_VENV)/.stamp
	$(BIN)/python bench/peers.py

bench-batch: venv redis java
	$(BIN)/python bench/batch.py

# The layers in .importlinter; make test checks them too (tests/contract/test_import_layers.py).
lint: lint-imports
lint-imports: venv
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .venv-helm .pytest_cache build *.egg-info

