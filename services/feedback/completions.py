"""Looking up completion records in the store, for validation: existence, owner, prompt, model version."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass

from sqlalchemy import Engine, select

from alignloop.store import key_in
from alignloop.store.schema import Completion


@dataclass(frozen=True)
class CompletionRef:
    completion_id: str
    api_key_hash: str
    prompt_hash: str
    model_name: str
    model_version: str


class CompletionIndex:
    """A cache over the store's completions (records never change, so a cached one is always right).

    A completion record reaches the store some milliseconds after its answer was sent, through the gateway's
    completion log, Kafka and the materializer; feedback may come sooner. A missing id is therefore polled
    for up to `wait_s` before it is reported missing.
    """

    def __init__(self, engine: Engine, executor: Executor, *, wait_s: float, max_cached: int = 200_000) -> None:
        self.engine = engine
        self.executor = executor
        self.wait_s = wait_s
        self.max_cached = max_cached
        self._cache: dict[str, CompletionRef] = {}

    async def get_many(self, ids: list[str], wait_s: float | None = None) -> dict[str, CompletionRef]:
        """The stored completions among `ids`; missing ones are polled for up to `wait_s` (default: the
        configured wait)."""
        found = {i: self._cache[i] for i in ids if i in self._cache}
        missing = [i for i in dict.fromkeys(ids) if i not in found]
        deadline = time.monotonic() + (self.wait_s if wait_s is None else min(wait_s, self.wait_s))
        delay = 0.02
        loop = asyncio.get_running_loop()
        while missing:
            rows = await loop.run_in_executor(self.executor, self._query, missing)
            for ref in rows:
                self._remember(ref)
                found[ref.completion_id] = ref
            missing = [i for i in missing if i not in found]
            remaining = deadline - time.monotonic()
            if not missing or remaining <= 0:
                break
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.25)
        return found

    def _remember(self, ref: CompletionRef) -> None:
        if len(self._cache) >= self.max_cached:
            self._cache.pop(next(iter(self._cache)))  # oldest first
        self._cache[ref.completion_id] = ref

    def _query(self, ids: list[str]) -> list[CompletionRef]:
        c = Completion
        stmt = select(c.completion_id, c.api_key_hash, c.prompt_hash, c.model_name, c.model_version)
        out = []
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 1000):
                chunk = ids[start:start + 1000]
                rows = conn.execute(stmt.where(key_in(self.engine.dialect.name, c.completion_id, chunk))).all()
                out.extend(CompletionRef(*row) for row in rows)  # .all(): row-by-row fetching costs 3x
        return out
