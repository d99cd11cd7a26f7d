"""Bearer API keys: application keys may call /v1; only operator keys reach operator routes. A rotated-out key
works until its grace period ends, as its holder's tenant."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from alignloop.credentials import DEFAULT_APP, OPERATOR, RESERVED_NAMES, Credentials, Limits, key_hash, load
from services.gateway import metrics
from services.gateway.errors import ApiError


class Role(str, Enum):
    APP = "app"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Caller:
    role: Role
    key_hash: str  # the tenant's id: the hash of its first key, the same after a rotation
    name: str = ""  # the key's name in the credentials file
    limits: Limits = Limits()  # the tenant's own rate limits, where it has them
    priority: int = 0  # where the tenant's requests queue in the engine: lower first


@dataclass(frozen=True)
class _Key:
    secret: bytes
    role: Role
    tenant: str
    name: str
    until: float | None = None  # a rotated-out key stops working at this Unix time


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
        def key(secret: str, role: Role, name: str, tenant: str, until: float | None = None) -> _Key:
            return _Key(secret.strip().encode(), role, tenant, name, until)

        # The role comes from where a key sits in the file, never from its name: an application added as
        # "operator" before such names were refused stays an application, with its own key's tenant.
        keys = [key(creds.app_key, Role.APP, DEFAULT_APP, creds.tenant(DEFAULT_APP)),
                key(creds.operator_key, Role.OPERATOR, OPERATOR, creds.tenant(OPERATOR))]
        keys += [key(k, Role.APP, name, key_hash(k) if name in RESERVED_NAMES else creds.tenant(name))
                 for name, k in creds.apps.items()]
        # `rotate` files a built-in key's old key under the built-in name.
        keys += [key(r.key, Role.OPERATOR if r.name == OPERATOR else Role.APP, r.name, creds.tenant(r.name),
                     r.until) for r in creds.retiring if r.name in creds.names()]
        self._keys = keys
        self._limits = creds.limits
        self._priorities = creds.priorities

    def names(self) -> dict[str, str]:
        """Tenant id -> the name of its key, for every tenant with a working key."""
        self._maybe_reload()
        return {k.tenant: k.name for k in self._keys}

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
        token = token.strip().encode()
        # compare_digest against every key: the time taken says nothing about which key nearly matched.
        match = None
        for candidate in self._keys:
            if hmac.compare_digest(token, candidate.secret):
                match = candidate
        if match is not None and match.until is not None:
            if match.until <= time.time():
                match = None
            else:
                metrics.RETIRING_KEY_REQUESTS.labels(match.name).inc()
        if match is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return Caller(match.role, match.tenant, match.name, self._limits.get(match.tenant, Limits()),
                      self._priorities.get(match.tenant, 0))

    def require_operator(self, caller: Caller) -> Caller:
        if caller.role is not Role.OPERATOR:
            raise ApiError(403, "This route needs an operator key.", "permission_error", code="operator_key_required")
        return caller
