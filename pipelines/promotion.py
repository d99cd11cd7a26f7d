"""Moving `@champion`, and moving it back: promotion and rollback in the MLflow registry.

The registered model keeps its champion history in the tag `alignloop.champion_history` (versions, oldest
first, comma-separated), so `rollback` knows where to return to even after several promotions. Every move
is also tagged on the version it lands on (`alignloop.promoted_at`, `alignloop.promoted_from`, and
`alignloop.promotion_reason`). Services that follow the alias (policy, reward) pick the change up by
polling it.

A canary is the alias `challenger` plus the registered-model tag `alignloop.canary_percent`: the canary policy
service serves the challenger, and the gateway sends it that share of chat traffic. Promoting the challenger
to champion ends the canary.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from alignloop.config import Settings
from alignloop.contracts import CANARY_PERCENT_TAG
from alignloop.registry import CanaryShare, ModelNotRegistered, canary_of, resolve_alias

HISTORY_TAG = "alignloop.champion_history"
ALIAS = "champion"


class NoEarlierChampion(ModelNotRegistered):
    """Rollback asked for, but the champion history holds nothing before the current champion."""


@dataclass(frozen=True)
class Move:
    name: str
    previous: str | None
    current: str


def _client(settings: Settings):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def _history(client, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags or {}
    return [v for v in tags.get(HISTORY_TAG, "").split(",") if v]


def _current(settings: Settings, name: str, alias: str = ALIAS) -> str | None:
    try:
        return resolve_alias(settings.tracking_uri, name, alias).version
    except ModelNotRegistered:
        return None


def _require_version(client, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelNotRegistered(f"{name} has no version {version}") from exc


def promote(settings: Settings, name: str, version: str, *, reason: str = "operator", alias: str = ALIAS) -> Move:
    """Points name@alias (champion) at `version` (which must exist) and records the move. A challenger
    promoted to champion stops being a canary."""
    client = _client(settings)
    _require_version(client, name, version)
    if alias == ALIAS and _current(settings, name, settings.policy_canary_alias) == str(version):
        clear_canary(settings, name)
    previous = _current(settings, name, alias)
    if previous == str(version):
        return Move(name, previous, str(version))
    history = _history(client, name)
    if previous and (not history or history[-1] != previous):
        history.append(previous)  # a champion set before history was kept (e.g. by `models init`)
    history.append(str(version))
    client.set_registered_model_alias(name, alias, str(version))
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[-100:]))
    for key, value in {"alignloop.promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
                       "alignloop.promoted_from": previous or "", "alignloop.promotion_reason": reason}.items():
        client.set_model_version_tag(name, str(version), key, value)
    return Move(name, previous, str(version))


def rollback(settings: Settings, name: str) -> Move:
    """Points name@champion back at the champion before the current one."""
    client = _client(settings)
    current = _current(settings, name)
    history = _history(client, name)
    while history and history[-1] == current:
        history.pop()
    if not history:
        raise NoEarlierChampion(f"{name}: no earlier champion to roll back to")
    target = history[-1]
    client.set_registered_model_alias(name, ALIAS, target)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
    client.set_model_version_tag(name, target, "alignloop.promotion_reason", f"rollback from {current}")
    return Move(name, current, target)


def set_canary(settings: Settings, name: str, version: str, percent: int, *,
               reason: str = "operator") -> CanaryShare:
    """Makes `version` the challenger and gives it `percent` (0..100) of the chat traffic."""
    if not 0 <= percent <= 100:
        raise ValueError("percent must be from 0 to 100")
    client = _client(settings)
    _require_version(client, name, version)
    if _current(settings, name) == str(version):
        raise ValueError(f"version {version} is the champion already; a canary needs another version")
    client.set_registered_model_alias(name, settings.policy_canary_alias, str(version))
    client.set_registered_model_tag(name, CANARY_PERCENT_TAG, str(percent))
    client.set_model_version_tag(name, str(version), "alignloop.canary_reason", reason)
    return CanaryShare(str(version), percent)


def clear_canary(settings: Settings, name: str) -> CanaryShare:
    """Ends the canary: no challenger, no traffic share. Returns what it was."""
    from mlflow.exceptions import MlflowException

    client = _client(settings)
    model = client.get_registered_model(name)
    was = canary_of(model, settings.policy_canary_alias)
    if was.version is not None:
        client.delete_registered_model_alias(name, settings.policy_canary_alias)
    if CANARY_PERCENT_TAG in (model.tags or {}):
        try:
            client.delete_registered_model_tag(name, CANARY_PERCENT_TAG)
        except MlflowException:  # removed meanwhile by another caller
            pass
    return was


def current_aliases(settings: Settings, name: str) -> tuple[dict[str, str], int]:
    """alias -> version for `name`, and the canary percent, in one registry call."""
    model = _client(settings).get_registered_model(name)
    return {a: str(v) for a, v in (model.aliases or {}).items()}, canary_of(model, settings.policy_canary_alias).percent


@dataclass(frozen=True)
class VersionInfo:
    version: str
    aliases: list[str]
    created_at: float  # unix seconds
    run_id: str
    tags: dict[str, str]
    description: str


def versions(settings: Settings, name: str, limit: int = 100) -> tuple[list[VersionInfo], int]:
    """The newest `limit` versions of `name`, newest first, with their aliases; and the canary percent."""
    client = _client(settings)
    model = client.get_registered_model(name)
    by_version: dict[str, list[str]] = {}
    for alias, v in (model.aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    found = client.search_model_versions(f"name = '{name}'", max_results=limit, order_by=["version_number DESC"])
    infos = [VersionInfo(version=str(mv.version), aliases=sorted(by_version.get(str(mv.version), [])),
                         created_at=(mv.creation_timestamp or 0) / 1000, run_id=mv.run_id or "",
                         tags=dict(mv.tags or {}), description=mv.description or "")
             for mv in found]
    return infos, canary_of(model, settings.policy_canary_alias).percent
