"""What differs between a wanted child and the live one, in the fields the operator owns."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from inferstack_operator.spec import quantity

Manifest = dict[str, Any]

# Fields the API server refuses to change once the object exists.
IMMUTABLE = {
    "StatefulSet": ("spec.selector", "spec.serviceName", "spec.volumeClaimTemplates"),
    "Deployment": ("spec.selector",),
}


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have and type(want) is type(have):
        return True
    # The API server canonicalises quantities ("0.5" -> "500m", 2 -> "2").
    numeric = (str, int, float)
    if isinstance(want, numeric) and isinstance(have, numeric) and not isinstance(want, bool) \
            and not isinstance(have, bool):
        try:
            return quantity(want) == quantity(have)
        except ValueError:
            return False
    return False


def drifted_paths(want: Any, have: Any, path: str = "") -> list[str]:
    """Where ``have`` (a live object) differs from ``want`` in the fields ``want`` sets.

    Fields only the live object has (server defaults, status, fields of other managers)
    are ignored; lists must match item by item.
    """
    if isinstance(want, Mapping):
        if not isinstance(have, Mapping):
            return [path or "."]
        found: list[str] = []
        for key, value in want.items():
            found += drifted_paths(value, have.get(key), f"{path}.{key}")
        return found
    if isinstance(want, list):
        if not isinstance(have, list) or len(want) != len(have):
            return [path or "."]
        found = []
        for index, (a, b) in enumerate(zip(want, have)):
            found += drifted_paths(a, b, f"{path}[{index}]")
        return found
    return [] if _same_scalar(want, have) else [path or "."]


def immutable_drift(want: Manifest, have: Manifest) -> list[str]:
    """Immutable fields whose wanted value differs from the live one (the object must be recreated)."""
    found: list[str] = []
    for dotted in IMMUTABLE.get(want.get("kind", ""), ()):
        a: Any = want
        b: Any = have
        for part in dotted.split("."):
            a = a.get(part) if isinstance(a, Mapping) else None
            b = b.get(part) if isinstance(b, Mapping) else None
        if (a is None) != (b is None) or (a is not None and drifted_paths(a, b)):
            found.append(dotted)
    return found


APPLIED_ANNOTATION = "inferstack.dev/applied"


def stamp(manifest: Manifest) -> Manifest:
    """``manifest`` with a digest of itself in an annotation: a spec change that only removes
    fields (invisible to ``drifted_paths`` on the live object) still shows as drift, here."""
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]
    meta = manifest.setdefault("metadata", {})
    meta["annotations"] = {**(meta.get("annotations") or {}), APPLIED_ANNOTATION: digest}
    return manifest

