"""Following a registry alias from a serving process: the policy and reward services both poll where
`NAME@ALIAS` points and load the new version when it moves, while the old one keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from alignloop.registry import ModelNotRegistered, ModelVersionRef, resolve_alias

# A version that failed to load is tried again after this long, not on every poll.
RETRY_FAILED_S = 60.0


async def follow_alias(tracking_uri: str, name: str, alias: str, poll_s: float, *,
                       current: Callable[[], str], load: Callable[[ModelVersionRef], Awaitable[None]],
                       stop: asyncio.Event, log: logging.Logger,
                       on_failure: Callable[[], None] | None = None) -> None:
    """Every `poll_s`, resolves name@alias; when it names a version other than `current()`, awaits
    `load(ref)`. A failed load is logged, the old version keeps serving, and that version is retried after
    RETRY_FAILED_S. An unreachable registry is logged and polled again."""
    failed: dict[str, float] = {}  # version -> when it last failed to load
    missing = False  # said once, not on every poll (a canary's alias is removed when the canary ends)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(poll_s):
                await stop.wait()
        if stop.is_set():
            return
        try:
            ref = await asyncio.to_thread(resolve_alias, tracking_uri, name, alias)
        except ModelNotRegistered as exc:
            if not missing:
                log.warning("%s; still serving version %s", exc, current())
            missing = True
            continue
        except Exception as exc:  # the registry is down or slow: keep serving what we have
            log.warning("could not resolve %s@%s: %s", name, alias, exc)
            continue
        missing = False
        if ref.version == current():
            continue
        if time.monotonic() - failed.get(ref.version, -RETRY_FAILED_S) < RETRY_FAILED_S:
            continue
        log.info("%s@%s moved to version %s: loading it", name, alias, ref.version)
        try:
            await load(ref)
        except Exception:
            log.exception("could not load %s version %s; still serving version %s", name, ref.version, current())
            failed[ref.version] = time.monotonic()
            if on_failure:
                on_failure()
