"""API keys of the local stack: one application key and one operator key, created on first start."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Credentials:
    app_key: str
    operator_key: str


def _new_key(prefix: str) -> str:
    return f"{prefix}-{secrets.token_urlsafe(32)}"


def load_or_create(path: Path) -> Credentials:
    """Reads `path`, or writes fresh keys there with mode 0600 when it does not exist yet."""
    if path.exists():
        return load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    creds = Credentials(app_key=_new_key("al-app"), operator_key=_new_key("al-op"))
    # O_EXCL + 0600 at creation: the keys are never readable by others, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"app_key": creds.app_key, "operator_key": creds.operator_key}, f, indent=2)
    return creds


def load(path: Path) -> Credentials:
    """Reads existing keys (the gateway does this; only `alignloop up` creates them)."""
    data = json.loads(path.read_text())
    return Credentials(app_key=data["app_key"], operator_key=data["operator_key"])


def key_hash(key: str) -> str:
    """A stable, non-reversible identifier of an API key, safe to log and to put on Kafka."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]
