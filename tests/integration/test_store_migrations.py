"""The store's Alembic migrations on real SQLite and PostgreSQL: they build exactly the ORM's schema, and an
older store upgrades in place, keeping its rows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select, text

from alignloop import store
from alignloop.store.schema import Base, Completion
from tests.conftest import store_database as database

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrations_build_the_orm_schema(backend, tmp_path):
    with database(backend, tmp_path) as url:
        assert store.upgrade(url) == store.head_revision()
        engine = store.connect(url)
        try:
            with engine.connect() as conn:
                diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        finally:
            engine.dispose()
        assert diff == [], f"the migrations and alignloop/store/schema.py disagree: {diff}"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_store_from_before_request_ids_upgrades_and_keeps_its_rows(backend, tmp_path):
    with database(backend, tmp_path) as url:
        cfg = store.alembic_config(url)
        engine = store.connect(url)
        try:
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "0003")
                now = datetime.now(UTC)
                conn.execute(text(
                    "INSERT INTO completions (completion_id, response_id, choice_index, api_key_hash,"
                    " prompt_hash, messages, response_text, prompt_tokens, completion_tokens, model_name,"
                    " model_version, sampling, stream, created_at, finished_at, ingested_at)"
                    " VALUES ('cmpl-old', 'chatcmpl-old', 0, 'h', 'p', '[]', 'an old answer', 1, 2,"
                    " 'alignloop-policy', '1', '{}', false, :t, :t, :t)"), {"t": now})
            assert store.upgrade(url) == store.head_revision()
            with engine.connect() as conn:
                row = conn.execute(select(Completion.response_text, Completion.request_id,
                                          Completion.cached_tokens)).one()
                assert store.current_revision(engine) == store.head_revision()
            assert tuple(row) == ("an old answer", None, None)
        finally:
            engine.dispose()
