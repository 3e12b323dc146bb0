"""What the web tier shows to whoever can reach its public port: no metrics, no internal names."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from tests.helpers import stack_log, wait_for
from tools.devstack import LocalStack, free_port


def healthy(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def web_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, int]]:
    """gunicorn with a metrics port, and a Redis URL where nothing listens (so it is unreachable)."""
    metrics_port = free_port()
    stack = LocalStack(env={"INFERSTACK_METRICS_PORT": str(metrics_port), "INFERSTACK_WEB_PROCESSES": "1"},
                       log_dir=str(tmp_path_factory.mktemp("web-logs")))
    stack.start_web()
    wait_for(lambda: healthy(stack.url), timeout=120, interval=0.2, what="the web tier starting",
             explain=lambda: stack_log(stack))
    yield stack, metrics_port
    stack.stop()


def test_metrics_answer_only_on_the_metrics_port(web_only: tuple[LocalStack, int]) -> None:
    stack, port = web_only
    assert requests.get(stack.url + "/metrics", timeout=10).status_code == 404
    private = f"http://127.0.0.1:{port}"
    rsp = requests.get(private + "/metrics", timeout=10)
    assert rsp.status_code == 200 and "inferstack_redis_up 0" in rsp.text
    # The metrics listener serves nothing else (a scraper allowed in there cannot classify).
    assert requests.post(private + "/predict", files={"image": ("x.png", b"x")}, timeout=10).status_code == 404
    assert requests.get(private + "/readyz", timeout=10).status_code == 404
    assert requests.get(stack.url + "/healthz", timeout=10).status_code == 200


def test_readyz_does_not_echo_internal_addresses(web_only: tuple[LocalStack, int]) -> None:
    stack, _ = web_only
    rsp = requests.get(stack.url + "/readyz", timeout=10)
    assert rsp.status_code == 503
    assert rsp.json() == {"ready": False, "reason": "Redis unreachable"}
    assert str(stack.redis_port) not in rsp.text and "127.0.0.1" not in rsp.text
