"""Plain data from config objects, and their hash: what a stage's config hash is computed on. No imports of the
project's own, so that pipeline/, stages/ and modalities/ can all use it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def to_plain(obj: Any, for_hash: bool = False) -> Any:
    """Dataclasses, dicts, lists and tuples -> dicts and lists of plain values (dict keys as str). for_hash: a field
    whose metadata has `hash_when_set` is left out while it is None (see hashed)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name), for_hash) for f in dataclasses.fields(obj)
                if not (for_hash and f.metadata.get("hash_when_set") and getattr(obj, f.name) is None)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v, for_hash) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, for_hash) for v in obj]
    return obj


def hashed(obj: Any) -> Any:
    """to_plain for a config hash: a setting added later (unset: the old behaviour) is left out while it is None, so
    that it does not make every run made before it stale."""
    return to_plain(obj, for_hash=True)


def stable_hash(obj: Any) -> str:
    """sha256 of a canonical JSON form; the hash of a config section."""
    return hashlib.sha256(json.dumps(to_plain(obj), sort_keys=True, default=str).encode()).hexdigest()
