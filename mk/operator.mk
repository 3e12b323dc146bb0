# Operator targets; include from the Makefile with: include mk/operator.mk
OPERATOR_PY ?= .venv/bin/python
OPERATOR_IMAGE ?= ghcr.io/inferstack/operator:0.1.0
OPERATOR_ARGS ?= --all-namespaces --verbose
KUBECTL ?= kubectl

.PHONY: operator-crd operator-run operator-test operator-lint operator-image

operator-crd: ## install/update the InferenceService CRD in the current kubeconfig's cluster
	$(KUBECTL) apply -f operator/inferstack_operator/crd.yaml

operator-run: operator-crd ## run the operator locally against the current kubeconfig (Ctrl-C stops it)
	$(OPERATOR_PY) -m inferstack_operator.cli $(OPERATOR_ARGS)

operator-test: ## operator unit + emulator end-to-end tests
	$(OPERATOR_PY) -m pytest tests/operator -q

operator-lint: ## hadolint the operator Dockerfile
	$(dir $(OPERATOR_PY))hadolint operator/Dockerfile

operator-image: ## build the operator image (context: the repository root)
	docker build -f operator/Dockerfile -t $(OPERATOR_IMAGE) .
