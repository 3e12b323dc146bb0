"""The operator's image allowlist (``INFERSTACK_ALLOWED_IMAGES``): which images, and which env.

An allowlist entry names images at a path boundary, after Docker's normalization of both sides
(``redis`` is ``docker.io/library/redis``; a first part with ``.`` or ``:``, or ``localhost``, is a
registry host, lower-cased):

| entry | allows |
| --- | --- |
| ``registry.io/ml`` or ``registry.io/ml/`` | the repository ``registry.io/ml`` and every one below it (``registry.io/ml/web``), any tag or digest; never ``registry.io/ml-evil/x`` |
| ``registry.io/ml/redis:`` | that repository only (nothing below it), any tag or digest |
| ``registry.io/ml/web:1.2`` | that repository with that tag (a digest added to it is allowed) |
| ``registry.io/ml/web@sha256:<hex>`` | that repository at that digest only |

An image that is not a valid reference is refused. An allowed image must also run only its own
code: with an allowlist set, env names that make the image load code from elsewhere (a mounted
claim, say) are refused too, in every tier (``CODE_LOADING_ENV``, ``CODE_LOADING_ENV_PREFIXES``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Env names that change what code a process runs, for the runtimes in our images (CPython, glibc's
# loader, OpenSSL, CUDA, the shells, gunicorn). Each would let a spec run code from a claim or a
# ConfigMap inside an allowed image.
CODE_LOADING_ENV: frozenset[str] = frozenset({
    # CPython: where modules, the standard library and site-packages come from; code it runs at start
    "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONPLATLIBDIR",
    "PYTHONPYCACHEPREFIX",  # compiled .pyc files read from another tree
    "PYTHONINSPECT",  # an interactive prompt after the program, reading code from stdin
    "PYTHONBREAKPOINT",  # a callable imported by breakpoint()
    "PYTHONWARNINGS",  # a filter's category "module.Class" imports that module
    "PYTHONEXECUTABLE",
    # the command itself (inferstack-web, inferstack-worker) is looked up on PATH
    "PATH",
    # glibc: iconv loads shared objects from GCONV_PATH
    "GCONV_PATH",
    # OpenSSL: a config file may load engines and providers (shared objects)
    "OPENSSL_CONF", "OPENSSL_ENGINES", "OPENSSL_MODULES",
    # CUDA loads this library into every process that initializes it
    "CUDA_INJECTION64_PATH",
    # shells read these files / function definitions when started
    "BASH_ENV", "ENV", "SHELLOPTS",
    # gunicorn's extra arguments: --config (a Python file), --preload, hooks
    "GUNICORN_CMD_ARGS",
})
# Every dynamic-loader variable (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, ...) and exported bash
# functions ("BASH_FUNC_name%%").
CODE_LOADING_ENV_PREFIXES: tuple[str, ...] = ("LD_", "BASH_FUNC_")

DOCKER_HUB = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
_PATH = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(rf"^(?:(?P<host>{_HOST})/)?(?P<path>{_PATH})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$")


@dataclass(frozen=True)
class ImageRef:
    """A normalized image reference: ``repository`` includes the registry host."""

    repository: str
    tag: str | None = None
    digest: str | None = None


def parse_image(image: str) -> ImageRef | None:
    """Docker's normalization of an image reference; None when it is not a valid one."""
    match = _REFERENCE.match(image.strip())
    if match is None:
        return None
    host, path = match["host"], match["path"]
    if host is not None and not ("." in host or ":" in host or host == "localhost"):
        path, host = f"{host}/{path}", None  # "inferstack/web": a Docker Hub namespace, not a host
    if host is None:
        host = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    return ImageRef(f"{host.lower()}/{path}", match["tag"], match["digest"])


@dataclass(frozen=True)
class AllowRule:
    """One allowlist entry: a repository subtree, one repository, a tag or a digest."""

    repository: str
    subtree: bool
    tag: str | None = None
    digest: str | None = None

    def allows(self, ref: ImageRef) -> bool:
        if self.subtree:
            return ref.repository == self.repository or ref.repository.startswith(self.repository + "/")
        if ref.repository != self.repository:
            return False
        if self.digest is not None:
            return ref.digest == self.digest
        return self.tag is None or ref.tag == self.tag


def parse_rule(entry: str) -> AllowRule:
    """An ``INFERSTACK_ALLOWED_IMAGES`` entry; ValueError when it names no image or repository."""
    text = entry.strip()
    exact = text.endswith(":")  # "repo:" is that repository, any tag
    body = text[:-1] if exact else text.rstrip("/")
    ref = parse_image(body)
    if ref is None:
        raise ValueError(f"{entry!r} is not an image prefix (e.g. registry.example.com/ml/ or "
                         f"registry.example.com/redis:)")
    subtree = not exact and ref.tag is None and ref.digest is None
    return AllowRule(ref.repository, subtree, ref.tag, ref.digest)


def image_allowed(image: str, rules: tuple[AllowRule, ...]) -> bool:
    ref = parse_image(image)
    return ref is not None and any(rule.allows(ref) for rule in rules)


def code_loading(name: str) -> bool:
    """Does this env name change what code the container runs?"""
    return name in CODE_LOADING_ENV or name.startswith(CODE_LOADING_ENV_PREFIXES)


def refused_env(env: tuple[Mapping[str, Any], ...]) -> list[str]:
    """The names in a spec's env list that an allowlisted image may not be given."""
    return sorted({str(item["name"]) for item in env if code_loading(str(item["name"]))})
