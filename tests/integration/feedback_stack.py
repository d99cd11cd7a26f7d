"""A feedback-only stack for tests: Tansu, the store, the materializer, the collector and the gateway, each a
real process the test can `kill -9` and start again. No vLLM: completion records are produced to Kafka
exactly as the gateway's completion log produces them (the chat path itself is covered in test_chat.py)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
from kafka import KafkaProducer
from sqlalchemy import Engine, func, select

from alignloop import components, credentials, store
from alignloop.config import Settings
from alignloop.kafka_admin import ensure_topics
from alignloop.store.schema import Completion
from alignloop.topics import COMPLETIONS_V1, ChatMessageV1, CompletionRecordV1, SamplingV1
from tests.conftest import free_port
from tests.integration.processes import ComponentProcesses


def feedback_settings(home: Path, store_url: str | None = None, **overrides) -> Settings:
    values = dict(
        home=home,
        kafka_port=free_port(),
        mlflow_port=free_port(),
        policy_port=free_port(),  # nothing listens: chat is not part of this stack
        gateway_port=free_port(),
        feedback_port=free_port(),
        materializer_port=free_port(),
        store_url=store_url,
        kafka_session_timeout_ms=6000,  # Tansu joins a group in about half of it
        feedback_completion_wait_s=1.0,
    )
    return Settings(**{**values, **overrides})


@dataclass
class FeedbackStack(ComponentProcesses):
    _producer: KafkaProducer | None = None
    _engine: Engine | None = None
    APPS = ("tenant-b",)

    def component(self, name: str) -> components.Component:
        factories = {"kafka": components.broker, "materializer": components.feedback_materializer,
                     "feedback": components.feedback_collector, "gateway": components.gateway}
        return factories[name](self.settings)

    def probe(self, name: str, component: components.Component):
        # The gateway's own probe (/readyz) also asks for a policy, which this stack does not run.
        if name == "gateway":
            return lambda: components.http_ok(f"{self.gateway}/healthz")
        return component.probe

    def up(self) -> FeedbackStack:
        self.settings.ensure_dirs()
        credentials.load_or_create(self.settings.credentials_path)
        for app in self.APPS:  # before the gateway starts: it reloads keys only once a second
            credentials.add_app(self.settings.credentials_path, app)
        self.start("kafka")
        ensure_topics(self.settings.kafka_bootstrap)
        store.upgrade(self.settings.store)
        for name in ("materializer", "feedback", "gateway"):
            self.start(name)
        return self

    def down(self) -> None:
        super().down()
        if self._producer:
            self._producer.close(5)
        if self._engine:
            self._engine.dispose()

    # ---- clients ----------------------------------------------------------------------------------------
    @property
    def gateway(self) -> str:
        return self.settings.gateway_url

    def key(self, app: str | None = None) -> str:
        path = self.settings.credentials_path
        if app is None:
            return credentials.load(path).app_key
        return credentials.add_app(path, app)

    def headers(self, app: str | None = None, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(app)}", **extra}

    def operator_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {credentials.load(self.settings.credentials_path).operator_key}"}

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = store.connect(self.settings.store)
        return self._engine

    def produce_completions(self, api_key: str, prompts: list[str], n: int = 1, model_version: str = "1",
                            created_at: float | None = None, cached_tokens: int | None = None) -> list[list[str]]:
        """Completion records as the gateway writes them (served now, or at `created_at`); returns the
        completion ids, per prompt. `cached_tokens` None: a record from before they were counted."""
        if self._producer is None:
            self._producer = KafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all",
                                           enable_idempotence=True)
        ids, now = [], time.time() if created_at is None else created_at
        for prompt in prompts:
            response_id = f"chatcmpl-{uuid.uuid4().hex}"
            group = []
            for index in range(n):
                rec = CompletionRecordV1(
                    completion_id=f"cmpl-{uuid.uuid4().hex}", response_id=response_id, choice_index=index,
                    messages=[ChatMessageV1(role="user", content=prompt)], response_text=f"answer {index}",
                    finish_reason="stop", prompt_tokens=5, cached_tokens=cached_tokens, completion_tokens=3,
                    model_name="alignloop-policy",
                    model_version=model_version, sampling=SamplingV1(n=n), api_key_hash=credentials.key_hash(api_key),
                    stream=False, created_at=now, finished_at=now,
                )
                self._producer.send(COMPLETIONS_V1, key=rec.completion_id.encode(), value=rec.model_dump_json().encode())
                group.append(rec.completion_id)
            ids.append(group)
        self._producer.flush(30)
        return ids

    def wait_stored_completions(self, ids: list[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.engine.connect() as conn:
                n = conn.execute(select(func.count()).where(Completion.completion_id.in_(ids))).scalar_one()
            if n == len(set(ids)):
                return
            time.sleep(0.1)
        raise AssertionError(f"only {n} of {len(ids)} completions reached the store")

    def post(self, path: str, body, app: str | None = None, timeout: float = 30, **headers: str) -> httpx.Response:
        content = body if isinstance(body, bytes | str) else json.dumps(body)
        return httpx.post(f"{self.gateway}{path}", content=content, timeout=timeout,
                          headers={**self.headers(app), "Content-Type": "application/json", **headers})
