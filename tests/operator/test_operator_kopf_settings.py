"""The kopf settings the operator's startup handler chooses, and why each matters."""

from __future__ import annotations

import os

import kopf
import pytest

from inferstack_operator import cli, handlers
from inferstack_operator.config import ENV_WATCH_NAMESPACE, OperatorSettings


def configured(monkeypatch: pytest.MonkeyPatch, settings: OperatorSettings) -> kopf.OperatorSettings:
    monkeypatch.setattr(handlers, "SETTINGS", settings)
    out = kopf.OperatorSettings()
    handlers.configure(settings=out, memo=kopf.Memo())
    return out


def test_a_deleted_resource_is_not_held_a_minute_by_a_running_resync(monkeypatch: pytest.MonkeyPatch) -> None:
    # kopf re-checks a timer it could not stop at once only after this long; its default is 60 s,
    # which the real-cluster tests saw as a `kubectl delete` hanging for a minute.
    assert configured(monkeypatch, OperatorSettings()).background.cancellation_polling <= 5


def test_scanning_is_off_exactly_when_namespaces_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    assert configured(monkeypatch, OperatorSettings()).scanning.disabled is False
    assert configured(monkeypatch, OperatorSettings(watch_namespaces=("team-a",))).scanning.disabled is True


@pytest.mark.parametrize("args, names", [
    (["--namespace", "a", "-n", "b"], ["a", "b"]),
    (["--namespace=a", "-nb"], ["a", "b"]),
    (["--all-namespaces"], []),
    (["run", "-m", "inferstack_operator.handlers", "--standalone"], []),
])
def test_the_cli_tells_the_handlers_which_namespaces_it_serves(args: list[str], names: list[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.named_namespaces(args) == names
    monkeypatch.setenv(ENV_WATCH_NAMESPACE, "")  # empty: all namespaces; restored after the test
    captured: dict[str, list[str]] = {}
    monkeypatch.setattr("kopf.cli.main", lambda args, prog_name: captured.setdefault("args", args))
    cli.main(args)
    assert captured["args"][:3] == ["run", "-m", "inferstack_operator.handlers"]
    assert os.environ[ENV_WATCH_NAMESPACE] == ",".join(names)
