"""Whose prefix cache a chat request may share: the salt the gateway gives each request's engine blocks.

vLLM reuses the KV blocks of any earlier prompt that began with the same tokens, and a reused prefix answers
sooner. Shared across tenants, that is a timing side channel: one tenant could tell, from its own time to first
token, whether another tenant's prompts begin with a text it guesses. vLLM's `cache_salt` keeps blocks apart by
salt; OpenAI does not share prompt caches between organisations either. So by default every tenant's requests
get a salt of their own, and a request's own `cache_salt` (vLLM's extension) splits its tenant's further, for an
application that must keep its end users apart.
"""

from __future__ import annotations

import hashlib
from typing import Literal

CacheScope = Literal["tenant", "shared"]


def cache_salt(scope: CacheScope, tenant: str, requested: str | None = None) -> str:
    """The engine's cache salt for a request of `tenant` that asked for `requested` ("" for none).

    "tenant": derived from the tenant, which no caller can choose, and the request's salt. "shared": every
    tenant shares the cache, as a bare vLLM server does; only a request's own salt sets its blocks apart.
    A hash either way: the engine sees no tenant id, and every salt has the same length.
    """
    if scope == "shared":
        if not requested:
            return ""
        parts = [b"request", requested.encode()]
    else:
        parts = [b"tenant", tenant.encode(), (requested or "").encode()]
    return hashlib.sha256(b"\0".join([b"alignloop-prefix-cache", *parts])).hexdigest()
