"""Bearer API keys: application keys may call /v1; only operator keys reach operator routes."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from alignloop.credentials import Credentials, key_hash, load
from services.gateway.errors import ApiError


class Role(str, Enum):
    APP = "app"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Caller:
    role: Role
    key_hash: str


class KeyRing:
    def __init__(self, creds: Credentials, path: Path | None = None) -> None:
        self._path = path
        self._mtime = path.stat().st_mtime_ns if path else 0
        self._checked_at = time.monotonic()
        self._use(creds)

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        """Keys from the credentials file, re-read when it changes (checked at most once a second)."""
        return cls(load(path), path)

    def _use(self, creds: Credentials) -> None:
        keys = [(creds.app_key, Role.APP), (creds.operator_key, Role.OPERATOR)]
        keys += [(k, Role.APP) for k in creds.apps.values()]
        self._keys = keys
        self._hashes = {k: key_hash(k) for k, _ in keys}

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self._path is None or now - self._checked_at < 1.0:
            return
        self._checked_at = now
        try:
            mtime = self._path.stat().st_mtime_ns
            if mtime != self._mtime:
                self._use(load(self._path))
                self._mtime = mtime
        except (OSError, ValueError, KeyError):
            pass  # keep the keys we have rather than lock everyone out over a bad edit

    def authenticate(self, authorization: str | None) -> Caller:
        self._maybe_reload()
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
        token = token.strip()
        # compare_digest against every key: the time taken says nothing about which key nearly matched.
        role = None
        for key, key_role in self._keys:
            if hmac.compare_digest(token.encode(), key.encode()):
                role = key_role
        if role is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return Caller(role=role, key_hash=self._hashes[token])

    def require_operator(self, caller: Caller) -> Caller:
        if caller.role is not Role.OPERATOR:
            raise ApiError(403, "This route needs an operator key.", "permission_error", code="operator_key_required")
        return caller
