"""Bearer API keys: application keys may call /v1; only operator keys reach operator routes."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import Enum

from alignloop.credentials import Credentials, key_hash
from services.gateway.errors import ApiError


class Role(str, Enum):
    APP = "app"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Caller:
    role: Role
    key_hash: str


class KeyRing:
    def __init__(self, creds: Credentials) -> None:
        self._keys = [(creds.app_key, Role.APP), (creds.operator_key, Role.OPERATOR)]
        self._hashes = {k: key_hash(k) for k, _ in self._keys}

    def authenticate(self, authorization: str | None) -> Caller:
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
