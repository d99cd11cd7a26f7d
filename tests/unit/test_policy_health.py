"""The policy service's grpc.health.v1 answers (services/policy/server.py), with a stand-in engine: ready
needs a working engine (a canary's need not have one yet); alive fails only once the engine died, which a
restart mends and waiting does not."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from services.policy.server import PolicyServicer


def answers(servicer: PolicyServicer) -> tuple[bool, bool]:
    async def ask():
        return await servicer.ready(), await servicer.alive()
    return asyncio.run(ask())


@pytest.mark.parametrize(("engine", "canary", "ready", "alive"), [
    (None, False, False, True),  # the champion's engine is still being built
    (None, True, True, True),  # a canary waiting for a challenger
    (SimpleNamespace(errored=False), False, True, True),
    (SimpleNamespace(errored=True), False, False, False),
    (SimpleNamespace(errored=True), True, False, False),
], ids=["loading", "canary-waiting", "serving", "engine-dead", "canary-engine-dead"])
def test_ready_and_alive(engine, canary: bool, ready: bool, alive: bool) -> None:
    servicer = PolicyServicer("champion", engine=engine, ready_without_engine=canary)
    assert answers(servicer) == (ready, alive)
