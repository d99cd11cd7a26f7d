"""Which policy service answers a chat request: the champion's, or for the canary share, the challenger's.

The canary policy service reports the challenger's version and its traffic share (GetInfo); the router asks it
every `canary_poll_s`. A request with a `user` field is sent the same way every time (a hash of the caller's key
and the user picks its bucket), so one person does not flip between versions mid-conversation; others are
split at random. A challenger that cannot be reached is skipped until it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc

from alignloop.v1 import policy_pb2 as pb
from alignloop.v1 import policy_pb2_grpc as pb_grpc
from services.gateway import metrics

log = logging.getLogger("alignloop.gateway.routing")

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class CanaryState:
    """What the canary policy service last said: the challenger it serves and the share it is given."""

    version: str = ""
    percent: int = 0
    ready: bool = False

    @property
    def active(self) -> bool:
        return self.ready and self.percent > 0 and bool(self.version)


def conversation_key(key_hash: str, user: str | None, messages: Iterable[tuple[str, str]]) -> str:
    """The policy channel's affinity value for a chat request: the same for every turn of one conversation.

    A conversation's later requests repeat its earlier messages and add to them, so its opening (every message
    up to and including the first user message: the system prompt and the first question) names it. The
    tenant and the end user (OpenAI's `user`) are part of it, so that many users opening alike are still
    spread over the replicas; `messages` are (role, text) pairs."""
    digest = hashlib.sha256(f"{key_hash}\0{user or ''}".encode())
    for role, text in messages:
        digest.update(f"\0{role}\0{len(text)}\0{text}".encode())
        if role == "user":
            break
    return digest.hexdigest()[:32]


def bucket(key_hash: str, user: str) -> float:
    """A stable number in [0, 100) for one end user of one API key."""
    digest = hashlib.sha256(f"{key_hash}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 / 100


class PolicyRouter:
    def __init__(self, champion: pb_grpc.PolicyServiceStub, canary: pb_grpc.PolicyServiceStub | None = None, *,
                 poll_s: float = 2.0, rng: Callable[[], float] = random.random) -> None:
        self.champion = champion
        self.canary = canary
        self.poll_s = poll_s
        self.state = CanaryState()
        self._rng = rng

    def choose(self, key_hash: str, user: str | None) -> tuple[pb_grpc.PolicyServiceStub, str]:
        """The stub to ask and its role."""
        state = self.state
        if self.canary is not None and state.active:
            draw = bucket(key_hash, user) if user else self._rng() * 100
            if draw < state.percent:
                metrics.POLICY_REQUESTS.labels(CHALLENGER).inc()
                return self.canary, CHALLENGER
        metrics.POLICY_REQUESTS.labels(CHAMPION).inc()
        return self.champion, CHAMPION

    def challenger_failed(self, exc: grpc.aio.AioRpcError) -> bool:
        """Whether a challenger's error means "ask the champion instead" (the service is gone); if so, the
        challenger gets no traffic until the next poll finds it ready."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            return False
        log.warning("the canary policy service is unavailable (%s); the champion answers", exc.details())
        self.state = CanaryState()
        metrics.CANARY_FALLBACKS.inc()
        return True

    async def refresh(self) -> CanaryState:
        if self.canary is None:
            return self.state
        try:
            info = await self.canary.GetInfo(pb.GetInfoRequest(), timeout=2)
            state = CanaryState(version=info.model.version, percent=info.canary_percent, ready=info.ready)
        except grpc.aio.AioRpcError:
            state = CanaryState()
        if state != self.state:
            log.info("canary: %s", f"version {state.version} gets {state.percent}% of chat traffic"
                     if state.active else "none (the champion answers everything)")
        self.state = state
        return state

    async def follow(self) -> None:
        """Refreshes the canary state every poll_s, until cancelled."""
        while True:
            with contextlib.suppress(Exception):  # never let a poll error end the loop
                await self.refresh()
            await asyncio.sleep(self.poll_s)
