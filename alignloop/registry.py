"""The MLflow model registry as every service sees it: resolve an alias, bring that version's folder home."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential


@dataclass(frozen=True)
class ModelVersionRef:
    name: str
    version: str
    run_id: str | None
    source: str


class ModelNotRegistered(LookupError):
    """The registry has no such model or alias."""


def _client(tracking_uri: str):
    from mlflow import MlflowClient  # heavy import, kept off the module's import path

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@retry(
    retry=retry_if_exception_type(ConnectionError),
    wait=wait_exponential(multiplier=0.5, max=5),
    stop=stop_after_delay(60),
    reraise=True,
)
def resolve_alias(tracking_uri: str, name: str, alias: str) -> ModelVersionRef:
    """The version `name@alias` points to now."""
    from mlflow.exceptions import MlflowException

    try:
        mv = _client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
            raise ModelNotRegistered(f"{name}@{alias} is not registered in {tracking_uri}") from exc
        raise
    return ModelVersionRef(name=name, version=str(mv.version), run_id=mv.run_id, source=mv.source)


def fetch_version(tracking_uri: str, ref: ModelVersionRef, cache_dir: Path) -> Path:
    """Downloads the version's artifacts into `cache_dir/NAME/vVERSION` once; later calls reuse them.

    A registered version is immutable, so the folder is a valid cache keyed by (name, version).
    """
    import mlflow.artifacts

    dest = cache_dir / ref.name / f"v{ref.version}"
    if (dest / ".complete").exists():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # Resolve the storage location through this client: a bare models:/ URI would consult the process-wide
    # registry URI, which is not necessarily `tracking_uri`.
    location = _client(tracking_uri).get_model_version_download_uri(ref.name, ref.version)
    got = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(partial), tracking_uri=tracking_uri)
    )
    # The source is a folder logged under a run (runs:/RUN/model): find its root, the shallowest folder holding
    # a config.json (a policy) or a reward_config.json (a reward model, whose config.json is in backbone/).
    markers = [*got.rglob("config.json"), *got.rglob("reward_config.json")]
    root = next((p.parent for p in sorted(markers, key=lambda p: len(p.parts))), got)
    shutil.rmtree(dest, ignore_errors=True)
    root.rename(dest)
    shutil.rmtree(partial, ignore_errors=True)
    (dest / ".complete").touch()
    return dest


def is_untrained(tracking_uri: str, ref: ModelVersionRef) -> bool:
    """Whether a registered reward-model version is an untrained placeholder (tag alignloop.untrained=true on
    the version, or on the run that logged it)."""
    from mlflow.exceptions import MlflowException

    from alignloop.contracts import UNTRAINED_TAG

    client = _client(tracking_uri)
    mv = client.get_model_version(ref.name, ref.version)
    tags = dict(mv.tags or {})
    if UNTRAINED_TAG not in tags and mv.run_id:
        with contextlib.suppress(MlflowException):  # the run may have been deleted: the version's tags count
            tags = client.get_run(mv.run_id).data.tags | tags
    return str(tags.get(UNTRAINED_TAG, "")).lower() == "true"


@dataclass(frozen=True)
class CanaryShare:
    """Where `name@alias` points (None: nowhere) and the share of traffic (0..100) it is given."""

    version: str | None
    percent: int


def canary_of(model, alias: str) -> CanaryShare:
    """The challenger `alias` of an MLflow RegisteredModel and its traffic share; 0% when it points nowhere."""
    from alignloop.contracts import CANARY_PERCENT_TAG

    version = (model.aliases or {}).get(alias)
    if version is None:
        return CanaryShare(None, 0)
    try:
        percent = int((model.tags or {}).get(CANARY_PERCENT_TAG) or 0)
    except ValueError:
        percent = 0
    return CanaryShare(str(version), max(0, min(100, percent)))


def canary_share(tracking_uri: str, name: str, alias: str) -> CanaryShare:
    """Where `name@alias` points now and its share of traffic, in one registry call."""
    return canary_of(_client(tracking_uri).get_registered_model(name), alias)
