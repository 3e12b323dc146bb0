# Operator targets (images: mk/images.mk, `make image-operator`). Included by the Makefile.
OPERATOR_ARGS ?= --all-namespaces --verbose
KUBECTL ?= kubectl

.PHONY: operator-crd operator-run operator-test

operator-crd: ## install/update the InferenceService CRD in the current kubeconfig's cluster (helm upgrade does not)
	$(KUBECTL) apply --server-side --force-conflicts -f operator/inferstack_operator/crd.yaml

operator-run: venv operator-crd ## run the operator locally against the current kubeconfig (Ctrl-C stops it)
	$(BIN)/inferstack-operator $(OPERATOR_ARGS)

operator-test: venv cluster-bin ## operator unit tests, then the operator on a real local control plane
	$(BIN)/python -m pytest tests/operator tests/cluster -q
