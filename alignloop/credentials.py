"""API keys of the local stack: an application key and an operator key, created on first start, plus any
named application keys added later (`alignloop keys add-app NAME`): each application is its own tenant."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Credentials:
    app_key: str
    operator_key: str
    apps: dict[str, str] = field(default_factory=dict)  # name -> key, for more applications (tenants)


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
    return Credentials(app_key=data["app_key"], operator_key=data["operator_key"], apps=data.get("apps", {}))


def add_app(path: Path, name: str) -> str:
    """Adds (or returns the existing) application key called `name`; the gateway picks it up within seconds."""
    creds = load(path)
    if name in creds.apps:
        return creds.apps[name]
    key = _new_key("al-app")
    data = {"app_key": creds.app_key, "operator_key": creds.operator_key, "apps": {**creds.apps, name: key}}
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    return key


def key_hash(key: str) -> str:
    """A stable, non-reversible identifier of an API key, safe to log and to put on Kafka."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]
