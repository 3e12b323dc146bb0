"""The operator's unit tests share tests/operator/kit.py; its end-to-end tests run on a real control plane (tests/cluster/)."""
