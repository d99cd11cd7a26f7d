"""Moving `@champion`, and moving it back: promotion and rollback in the MLflow registry.

The registered model keeps its champion history in the tag `alignloop.champion_history` (versions, oldest
first, comma-separated), so `rollback` knows where to return to even after several promotions. Every move
is also tagged on the version it lands on (`alignloop.promoted_at`, `alignloop.promoted_from`, and
`alignloop.promotion_reason`). Services that follow the alias (policy, reward) pick the change up by
polling it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from alignloop.config import Settings
from alignloop.registry import ModelNotRegistered, resolve_alias

HISTORY_TAG = "alignloop.champion_history"
ALIAS = "champion"


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


def promote(settings: Settings, name: str, version: str, *, reason: str = "operator", alias: str = ALIAS) -> Move:
    """Points name@alias (champion) at `version` (which must exist) and records the move."""
    from mlflow.exceptions import MlflowException

    client = _client(settings)
    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelNotRegistered(f"{name} has no version {version}") from exc
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
        raise ModelNotRegistered(f"{name}: no earlier champion to roll back to")
    target = history[-1]
    client.set_registered_model_alias(name, ALIAS, target)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
    client.set_model_version_tag(name, target, "alignloop.promotion_reason", f"rollback from {current}")
    return Move(name, current, target)
