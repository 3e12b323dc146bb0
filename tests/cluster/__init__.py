"""The chart and the operator against a real Kubernetes control plane (tests/kubeplane.py)."""
