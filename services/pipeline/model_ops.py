"""Operators' registry moves, served by the runner: list versions, promote, roll back, start or end a canary.

They take the runner's registry lock, so they never interleave with a run's promote step, and they are
refused while a run is promoting (its serving step is waiting for the version it promoted).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from alignloop.v1 import pipeline_pb2 as pb
from pipelines import promotion

log = logging.getLogger("alignloop.pipeline.models")


class Refused(Exception):
    """The move cannot be made now (a run is promoting)."""


class BadRequest(ValueError):
    """A request field is wrong; `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class ModelOps:
    def __init__(self, runner) -> None:
        self.runner = runner
        self.settings = runner.settings

    def model_name(self, given: str) -> str:
        s = self.settings
        name = given or s.policy_model_name
        if name not in (s.policy_model_name, s.reward_model_name):
            raise BadRequest(f"model must be {s.policy_model_name} or {s.reward_model_name}", "model")
        return name

    @contextmanager
    def _moving(self):
        if self.runner.promoting:
            raise Refused(f"pipeline run {', '.join(sorted(self.runner.promoting))} is promoting; try again when it "
                          "has finished")
        with self.runner.registry_lock:
            yield

    def aliases(self, name: str, previous: str = "") -> pb.ModelAliases:
        s = self.settings
        current, percent = promotion.current_aliases(s, name)
        return pb.ModelAliases(model=name, champion=current.get("champion", ""),
                               challenger=current.get(s.policy_canary_alias, ""), canary_percent=percent,
                               previous_champion=previous)

    def list(self, model: str, limit: int) -> pb.ListModelVersionsResponse:
        name = self.model_name(model)
        limit = limit or 100
        if not 1 <= limit <= 500:
            raise BadRequest("limit must be from 1 to 500", "limit")
        found, percent = promotion.versions(self.settings, name, limit)
        return pb.ListModelVersionsResponse(model=name, canary_percent=percent, versions=[
            pb.ModelVersion(version=v.version, aliases=v.aliases, created_at=v.created_at, run_id=v.run_id,
                            tags=v.tags, description=v.description) for v in found])

    def set_canary(self, version: str, percent: int, reason: str, requested_by: str) -> pb.ModelAliases:
        name = self.settings.policy_model_name
        if not version:
            raise BadRequest("version is required", "version")
        if not 0 <= percent <= 100:
            raise BadRequest("percent must be from 0 to 100", "percent")
        with self._moving():
            try:
                promotion.set_canary(self.settings, name, version, percent,
                                     reason=reason or f"operator {requested_by[:12]}")
            except ValueError as exc:
                raise BadRequest(str(exc), "version") from None
        log.info("canary: %s v%s gets %d%% of chat traffic", name, version, percent)
        return self.aliases(name)

    def clear_canary(self) -> pb.ModelAliases:
        name = self.settings.policy_model_name
        with self._moving():
            was = promotion.clear_canary(self.settings, name)
        log.info("canary ended (challenger was %s)", was.version)
        return self.aliases(name)

    def promote(self, model: str, version: str, reason: str, requested_by: str) -> pb.ModelAliases:
        name = self.model_name(model)
        if not version:
            raise BadRequest("version is required", "version")
        with self._moving():
            move = promotion.promote(self.settings, name, version, reason=reason or f"operator {requested_by[:12]}")
        log.info("%s@champion: %s → %s", name, move.previous, move.current)
        return self.aliases(name, previous=move.previous or "")

    def rollback(self, model: str) -> pb.ModelAliases:
        name = self.model_name(model)
        with self._moving():
            try:
                move = promotion.rollback(self.settings, name)
            except promotion.NoEarlierChampion as exc:
                raise Refused(str(exc)) from None
        log.info("%s@champion rolled back: %s → %s", name, move.previous, move.current)
        return self.aliases(name, previous=move.previous or "")

