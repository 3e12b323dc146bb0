"""A short headless locust run against the local stack: zero failures, and the gate really gates."""

from __future__ import annotations

import csv

from loadtest.run import locust_argv
from tests.helpers import digits_env


def run_locust(host: str, out, seconds: int, *extra: str) -> int:
    import subprocess

    argv = locust_argv(host, users=8, spawn_rate=8, duration=f"{seconds}s", out=out, extra=list(extra))
    return subprocess.run(argv, timeout=seconds + 60, capture_output=True).returncode


def totals(out) -> dict[str, str]:
    with open(out / "predict_stats.csv") as fh:
        return next(row for row in csv.DictReader(fh) if row["Name"] == "Aggregated")


def test_locust_smoke_zero_failures(make_stack, digits_model, tmp_path):
    stack = make_stack(workers=1, env=digits_env(digits_model))
    code = run_locust(stack.url, tmp_path, 12, "--max-fail-ratio", "0", "--max-p95-ms", "5000")
    row = totals(tmp_path)
    assert int(row["Request Count"]) > 50
    assert int(row["Failure Count"]) == 0
    assert code == 0
    assert (tmp_path / "report.html").stat().st_size > 1000


def test_locust_gate_fails_when_requests_fail(make_stack, digits_model, tmp_path):
    # No worker and a 1 s timeout: every request gets a 504, and the run must exit non-zero.
    stack = make_stack(workers=0, env=digits_env(digits_model, INFERSTACK_REQUEST_TIMEOUT_S="1"), wait=False)
    stack.wait_ready(timeout_s=60, workers=0)  # web and Redis up; no worker needed
    code = run_locust(stack.url, tmp_path, 4, "--max-fail-ratio", "0")
    assert int(totals(tmp_path)["Failure Count"]) > 0
    assert code == 1


def test_locust_gate_fails_on_p95(make_stack, digits_model, tmp_path):
    stack = make_stack(workers=1, env=digits_env(digits_model))
    code = run_locust(stack.url, tmp_path, 4, "--max-fail-ratio", "0", "--max-p95-ms", "0.001")
    assert int(totals(tmp_path)["Failure Count"]) == 0
    assert code == 1
