"""The Redis passwords of one InferenceService: generated once, then read back from its Secret.

The reconciler (not the pure builders) owns the randomness: it reads the live Secret
``<name>-redis-auth`` and keeps its passwords, or generates new ones when it is missing
(first create, or a user deleted it to rotate them). Builders take the result as input.
Nothing here is ever logged: ``repr`` hides the values.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from inferstack.contract.acl import HEALTH, KEDA, WEB, WORKER

# Secret keys (the contract with the autoscaling TriggerAuthentication and the pods).
WEB_URL_KEY = "web-url"
WORKER_URL_KEY = "worker-url"
KEDA_USERNAME_KEY = "keda-username"
KEDA_PASSWORD_KEY = "keda-password"
HEALTH_PASSWORD_KEY = "health-password"
ACL_KEY = "users.acl"
# The queue's Redis function library (Lua): the Redis pod's start hook loads it.
FUNCTIONS_KEY = "functions.lua"


@dataclass(frozen=True)
class RedisAuth:
    """One password per Redis user (the usernames are the roles: web, worker, keda, health)."""

    web: str
    worker: str
    keda: str
    health: str

    def __repr__(self) -> str:
        return "RedisAuth(<redacted>)"

    @classmethod
    def generate(cls) -> RedisAuth:
        # 256 bits each; hex so they need no escaping in a URL or the ACL file.
        return cls(**{f.name: secrets.token_hex(32) for f in fields(cls)})

    @classmethod
    def from_secret(cls, secret: Mapping[str, Any] | None) -> RedisAuth | None:
        """The passwords in a live Secret, or None when it is missing or not one we wrote whole."""
        data = (secret or {}).get("data") or {}
        try:
            plain = {k: base64.b64decode(v, validate=True).decode() for k, v in data.items()}
            found = {
                WEB: urlsplit(plain[WEB_URL_KEY]).password,
                WORKER: urlsplit(plain[WORKER_URL_KEY]).password,
                KEDA: plain[KEDA_PASSWORD_KEY],
                HEALTH: plain[HEALTH_PASSWORD_KEY],
            }
        except (KeyError, ValueError, binascii.Error, UnicodeDecodeError):
            return None
        if not all(isinstance(v, str) and len(v) >= 32 for v in found.values()):
            return None
        return cls(**found)  # type: ignore[arg-type]

    def digest(self) -> str:
        """Changes when any password does: a pod-template annotation, so a rotation rolls the pods."""
        joined = "\0".join(getattr(self, f.name) for f in fields(self))
        return hashlib.sha256(joined.encode()).hexdigest()[:16]

    def users(self) -> dict[str, tuple[str, str]]:
        """role -> (username, password), for the ACL file."""
        return {f.name: (f.name, getattr(self, f.name)) for f in fields(self)}
