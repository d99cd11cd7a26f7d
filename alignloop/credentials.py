"""API keys of the local stack: an application key and an operator key, created on first start, plus any
named application keys added later (`alignloop keys add-app NAME`): each application is its own tenant.

Keys can be rotated and revoked without a restart (the gateway re-reads the file within a second):

- rotating gives a key's holder a new key and keeps the old one working for a grace period, so that
  applications can roll over without a failed request;
- a tenant is identified by the hash of its first key, kept across rotations (`tenants`), so that feedback
  sent with a new key still reaches answers served under the old one, and idempotency keys still match;
- revoking removes an application's keys at once; what it stored stays.

A tenant may have its own rate limits (`alignloop keys limit NAME`), in place of the gateway's defaults, and
its own scheduling priority (`alignloop keys priority NAME`), where its requests queue in the engine.

The file: `{"app_key", "operator_key", "apps": {NAME: key}, "tenants": {NAME: id}, "retiring": [{"name",
"key", "until"}], "limits": {TENANT_ID: {"requests_per_minute", "tokens_per_minute"}}, "priorities":
{TENANT_ID: int}}`; `tenants` and `retiring` only once a key has been rotated, `limits` and `priorities` only
once one is set. Both are filed under the tenant's id, not its name, so that they follow it through rotations
and can never be taken by another key's name.
`app_key` and `operator_key` are always the current keys, so anything that reads them keeps working.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_APP = "default"  # the name of `app_key`
OPERATOR = "operator"  # the name of `operator_key`
RESERVED_NAMES = (DEFAULT_APP, OPERATOR)


@dataclass(frozen=True)
class RetiringKey:
    """A rotated-out key that still works until `until` (Unix time)."""

    name: str
    key: str
    until: float


@dataclass(frozen=True)
class Limits:
    """A tenant's rate limits. None: the gateway's default; 0: no limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def over(self, default: Limits) -> Limits:
        """These limits, with `default`'s where these have none."""
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        return Limits(default.requests_per_minute if rpm is None else rpm,
                      default.tokens_per_minute if tpm is None else tpm)

    def document(self) -> dict[str, int]:
        return {k: v for k, v in (("requests_per_minute", self.requests_per_minute),
                                  ("tokens_per_minute", self.tokens_per_minute)) if v is not None}


@dataclass(frozen=True)
class Credentials:
    app_key: str
    operator_key: str
    apps: dict[str, str] = field(default_factory=dict)  # name -> key, for more applications (tenants)
    tenants: dict[str, str] = field(default_factory=dict)  # name -> tenant id, once its key has been rotated
    retiring: tuple[RetiringKey, ...] = ()
    limits: dict[str, Limits] = field(default_factory=dict)  # tenant id -> its own limits
    priorities: dict[str, int] = field(default_factory=dict)  # tenant id -> its own scheduling priority

    def names(self) -> list[str]:
        return [DEFAULT_APP, OPERATOR, *self.apps]

    def current(self, name: str) -> str:
        """The current key of `name` (`default`, `operator` or an application's name); KeyError if none."""
        if name == DEFAULT_APP:
            return self.app_key
        if name == OPERATOR:
            return self.operator_key
        return self.apps[name]

    def tenant(self, name: str) -> str:
        """The stable id of `name`: the hash of its first key, which rotation does not change."""
        return self.tenants.get(name) or key_hash(self.current(name))

    def retiring_at(self, now: float) -> list[RetiringKey]:
        """Rotated-out keys still within their grace period at `now`."""
        return [r for r in self.retiring if r.until > now]


class CredentialsError(ValueError):
    """A key operation that cannot be done (unknown or reserved name); the message says why."""


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
        json.dump(_document(creds), f, indent=2)
    return creds


def load(path: Path) -> Credentials:
    """Reads existing keys (the gateway does this; only `alignloop up` creates them)."""
    data = json.loads(path.read_text())
    return Credentials(
        app_key=data["app_key"], operator_key=data["operator_key"], apps=data.get("apps", {}),
        tenants=data.get("tenants", {}),
        retiring=tuple(RetiringKey(r["name"], r["key"], float(r["until"])) for r in data.get("retiring", [])),
        limits={tenant: Limits(v.get("requests_per_minute"), v.get("tokens_per_minute"))
                for tenant, v in data.get("limits", {}).items()},
        priorities={tenant: int(v) for tenant, v in data.get("priorities", {}).items()},
    )


def _document(creds: Credentials) -> dict:
    """The file's JSON: the optional parts only when they hold something."""
    data: dict = {"app_key": creds.app_key, "operator_key": creds.operator_key}
    if creds.apps:
        data["apps"] = creds.apps
    if creds.tenants:
        data["tenants"] = creds.tenants
    if creds.retiring:
        data["retiring"] = [{"name": r.name, "key": r.key, "until": r.until} for r in creds.retiring]
    if creds.limits:
        data["limits"] = {tenant: limits.document() for tenant, limits in creds.limits.items()}
    if creds.priorities:
        data["priorities"] = creds.priorities
    return data


def _write(path: Path, creds: Credentials) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(_document(creds), f, indent=2)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


@contextmanager
def _locked(path: Path) -> Iterator[Credentials]:
    """The credentials, read under an exclusive lock held until the caller has written them back: two
    commands run at once cannot lose each other's change."""
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield load(path)
    finally:
        os.close(fd)  # releases the lock


def add_app(path: Path, name: str) -> str:
    """Adds (or returns the existing) application key called `name`; the gateway takes it within a second."""
    if name in RESERVED_NAMES:
        raise CredentialsError(f"'{name}' names a built-in key; choose another application name")
    with _locked(path) as creds:
        if name in creds.apps:
            return creds.apps[name]
        key = _new_key("al-app")
        _write(path, replace(creds, apps={**creds.apps, name: key}))
        return key


def rotate(path: Path, name: str, grace_s: float, now: float | None = None) -> str:
    """Gives `name` a new key and returns it. The old one keeps working for `grace_s` seconds (0: stops now);
    the tenant's id does not change. Rotated-out keys whose grace has ended are dropped from the file."""
    now = time.time() if now is None else now
    with _locked(path) as creds:
        try:
            old = creds.current(name)
        except KeyError:
            raise CredentialsError(f"no key named '{name}' (known: {', '.join(creds.names())})") from None
        key = _new_key("al-op" if name == OPERATOR else "al-app")
        tenants = {**creds.tenants, name: creds.tenant(name)}
        retiring = [r for r in creds.retiring_at(now) if grace_s > 0 or r.name != name]
        if grace_s > 0:
            retiring.append(RetiringKey(name, old, now + grace_s))
        if name == DEFAULT_APP:
            creds = replace(creds, app_key=key)
        elif name == OPERATOR:
            creds = replace(creds, operator_key=key)
        else:
            creds = replace(creds, apps={**creds.apps, name: key})
        _write(path, replace(creds, tenants=tenants, retiring=tuple(retiring)))
        return key


def revoke(path: Path, name: str) -> None:
    """Removes application `name` and every key it had, at once. What it stored stays in the store."""
    if name in RESERVED_NAMES:
        raise CredentialsError(f"'{name}' cannot be removed; `alignloop keys rotate {name} --grace 0` "
                               "replaces it and stops the old key at once")
    with _locked(path) as creds:
        if name not in creds.apps:
            known = ", ".join(creds.apps) or "none"
            raise CredentialsError(f"no application named '{name}' (known: {known})")
        tenant = creds.tenant(name)
        _write(path, replace(
            creds,
            apps={n: k for n, k in creds.apps.items() if n != name},
            tenants={n: t for n, t in creds.tenants.items() if n != name},
            retiring=tuple(r for r in creds.retiring if r.name != name),
            limits={t: v for t, v in creds.limits.items() if t != tenant},
            priorities={t: v for t, v in creds.priorities.items() if t != tenant},
        ))


def _tenant_of(creds: Credentials, name: str) -> str:
    """The tenant id of the key called `name`; refused, naming the known keys, if there is none."""
    if name not in creds.names():
        raise CredentialsError(f"no key named '{name}' (known: {', '.join(creds.names())})")
    return creds.tenant(name)


KEEP = "keep"  # set_limits: leave this limit as it is


def set_limits(path: Path, name: str, requests_per_minute: int | None | str = KEEP,
               tokens_per_minute: int | None | str = KEEP) -> Limits:
    """Sets `name`'s own rate limits and returns them: an int (0: no limit), None (back to the gateway's
    default) or KEEP (unchanged), for each. The gateway applies them within a second."""
    for value in (requests_per_minute, tokens_per_minute):
        if isinstance(value, int) and value < 0:
            raise CredentialsError("a limit is a number of requests or tokens per minute, 0 for none")
    with _locked(path) as creds:
        tenant = _tenant_of(creds, name)
        old = creds.limits.get(tenant, Limits())
        new = Limits(old.requests_per_minute if requests_per_minute == KEEP else requests_per_minute,
                     old.tokens_per_minute if tokens_per_minute == KEEP else tokens_per_minute)
        limits = {t: v for t, v in creds.limits.items() if t != tenant}
        if new != Limits():
            limits[tenant] = new
        _write(path, replace(creds, limits=limits))
        return new


# vLLM orders its queue by a Python int; the policy service's gRPC field is an int32.
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1


def set_priority(path: Path, name: str, priority: int | None) -> None:
    """Sets `name`'s scheduling priority: where its chat requests queue when the engine's batch is full, lower
    first (vLLM's convention; tenants without one have 0). None: back to 0. The gateway applies it within a
    second; it orders anything only on an engine with the "priority" scheduling policy."""
    if priority is not None and not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise CredentialsError(f"a priority is an integer from {PRIORITY_MIN} to {PRIORITY_MAX}")
    with _locked(path) as creds:
        tenant = _tenant_of(creds, name)
        priorities = {t: v for t, v in creds.priorities.items() if t != tenant}
        if priority:
            priorities[tenant] = priority
        _write(path, replace(creds, priorities=priorities))


def key_hash(key: str) -> str:
    """A stable, non-reversible identifier of an API key, safe to log and to put on Kafka."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]
