"""INFERSTACK_ALLOWED_IMAGES: images matched at a path boundary, and no env that swaps the code they run."""

from __future__ import annotations

from typing import Any

import pytest

from inferstack_operator import reconcile, spec
from inferstack_operator.config import OperatorSettings, SettingsError
from inferstack_operator.imagepolicy import CODE_LOADING_ENV, code_loading

DIGEST = "sha256:" + "ab" * 32
ALLOWLIST = OperatorSettings.from_env({
    "INFERSTACK_ALLOWED_IMAGES": f"registry.io/inferstack, ghcr.io/ml/, registry.io/redis:, "
                                 f"ghcr.io/tools/web:1.2, ghcr.io/pinned/worker@{DIGEST}, redis",
})
NO_ALLOWLIST = OperatorSettings()


def body(spec_: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "demo", "namespace": "ml"}, "spec": spec_}


def admitted(image: str, settings: OperatorSettings = ALLOWLIST) -> bool:
    try:
        reconcile.resolve_body(body({"worker": {"image": image}}), settings)
    except spec.SpecError as e:
        assert e.reason == "InvalidSpec" and e.permanent and "spec.worker.image" in e.message
        return False
    return True


@pytest.mark.parametrize("image, allowed", [
    ("registry.io/inferstack/worker:1", True),
    ("registry.io/inferstack:2", True),  # the prefix's own repository
    ("registry.io/inferstack/team/worker@" + DIGEST, True),
    ("REGISTRY.IO/inferstack/worker:1", True),  # registry hosts are case-insensitive
    ("registry.io/inferstack-evil/x:1", False),  # a longer name, not a path below the prefix
    ("registry.io/inferstackx:1", False),
    ("registry.io/inferstack/../evil/x:1", False),  # not a valid reference at all
    ("registry.io.evil.com/inferstack/x:1", False),
    ("ghcr.io/ml/web:3", True),  # a trailing "/" means the same as none
    ("ghcr.io/mlx/web:3", False),
    ("registry.io/redis:7.4.6", True),  # "repo:" is that repository, any tag
    ("registry.io/redis@" + DIGEST, True),
    ("registry.io/redis/sidecar:1", False),  # ... and nothing below it
    ("ghcr.io/tools/web:1.2", True),  # "repo:tag": that tag only
    ("ghcr.io/tools/web:1.2@" + DIGEST, True),
    ("ghcr.io/tools/web:1.3", False),
    ("ghcr.io/tools/web", False),
    ("ghcr.io/pinned/worker@" + DIGEST, True),  # "repo@digest": that digest only
    ("ghcr.io/pinned/worker@sha256:" + "cd" * 32, False),
    ("ghcr.io/pinned/worker:latest", False),
    ("redis:7", True),  # Docker Hub names are normalized on both sides
    ("docker.io/library/redis:7", True),
    ("docker.io/evil/redis:7", False),
    ("redis/evil:7", False),  # docker.io/redis/evil, not below docker.io/library/redis
])
def test_images_match_at_a_path_boundary(image: str, allowed: bool) -> None:
    assert admitted(image) is allowed
    assert admitted(image, NO_ALLOWLIST)  # without an allowlist, any image


def test_a_bad_allowlist_entry_stops_the_operator_at_start() -> None:
    with pytest.raises(SettingsError, match="INFERSTACK_ALLOWED_IMAGES: 'registry.io/ml/../x'"):
        OperatorSettings.from_env({"INFERSTACK_ALLOWED_IMAGES": "ghcr.io/ml/, registry.io/ml/../x"})


@pytest.mark.parametrize("name", ["PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONUSERBASE", "PYTHONINSPECT",
                                  "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "GCONV_PATH", "PATH",
                                  "GUNICORN_CMD_ARGS", "OPENSSL_CONF", "BASH_FUNC_ls%%"])
@pytest.mark.parametrize("tier", ["web", "worker", "redis"])
def test_code_loading_env_is_invalid_with_an_allowlist(name: str, tier: str) -> None:
    spec_ = {tier: {"env": [{"name": "HARMLESS", "value": "1"}, {"name": name, "value": "/mnt/models"}]}}
    with pytest.raises(spec.SpecError) as info:
        reconcile.resolve_body(body(spec_), ALLOWLIST)
    assert info.value.reason == "InvalidSpec" and info.value.permanent
    assert info.value.message.startswith(f"spec.{tier}.env sets {name}: with an image allowlist"), info.value.message
    # From a Secret it is the same code path.
    spec_[tier]["env"][1] = {"name": name, "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
    with pytest.raises(spec.SpecError, match=f"spec.{tier}.env sets"):
        reconcile.resolve_body(body(spec_), ALLOWLIST)
    reconcile.resolve_body(body({tier: {"env": [{"name": name, "value": "/mnt/models"}]}}), NO_ALLOWLIST)


def test_ordinary_env_stays_allowed() -> None:
    ordinary = ["OMP_NUM_THREADS", "TF_CPP_MIN_LOG_LEVEL", "PYTHONUNBUFFERED", "PYTHONHASHSEED", "HTTP_PROXY",
                "INFERSTACK_LOG_LEVEL", "LANG", "LDAP_URL", "PATHNAME"]
    assert not [n for n in ordinary if code_loading(n)]
    env = [{"name": n, "value": "1"} for n in ordinary]
    reconcile.resolve_body(body({"web": {"env": env}, "worker": {"env": env}}), ALLOWLIST)
    assert {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PATH"} <= CODE_LOADING_ENV
