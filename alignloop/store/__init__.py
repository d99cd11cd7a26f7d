"""The feedback store: SQLAlchemy engine, Alembic migrations, and the one write primitive both backends share.

SQLite by default (`ALIGNLOOP_HOME/feedback.db`), PostgreSQL when `ALIGNLOOP_STORE_URL` points at one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Table, any_, bindparam, create_engine, event, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import make_url

MIGRATIONS = Path(__file__).with_name("migrations")


def connect(url: str, **kwargs) -> Engine:
    """An engine for `url`; SQLite gets WAL (readers never wait for the writer) and full fsync on commit,
    because an offset is committed to Kafka only after the database commit it covers."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # prepare_threshold=None: no server-side prepared statements. Their generic plans cannot see how many keys
    # an `= ANY(:ids)` holds and fall back to sequential scans that grow with the table.
    return create_engine(url, pool_pre_ping=True, connect_args={"prepare_threshold": None}, **kwargs)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> str:
    """Brings the schema to the newest migration; returns that revision. Safe to run again."""
    cfg = alembic_config(url)
    engine = connect(url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()
    return ScriptDirectory.from_config(cfg).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def key_in(dialect_name: str, column, ids: Sequence[str]):
    """`column IN ids` as one array parameter on PostgreSQL (psycopg parses a long IN list on every call),
    a plain IN elsewhere (SQLite caps a statement at 32,766 parameters: keep ids to a few thousand)."""
    if dialect_name == "postgresql":
        return column == any_(bindparam("ids", list(ids), type_=ARRAY(column.type)))
    return column.in_(list(ids))


def insert_ignoring_duplicates(conn: Connection, table: Table, rows: Sequence[dict], key: Sequence[str]) -> int:
    """INSERT ... ON CONFLICT (key) DO NOTHING; returns how many rows were new."""
    if not rows:
        return 0
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"the feedback store supports SQLite and PostgreSQL, not {conn.dialect.name}")
    stmt = insert(table).on_conflict_do_nothing(index_elements=list(key))
    if conn.dialect.name == "sqlite":
        # sqlite3's executemany sums rowcount over the rows, and skipping RETURNING makes it 3x cheaper per row.
        return conn.execute(stmt, list(rows)).rowcount
    if len(key) == 1:
        # psycopg reports no rowcount for a batched insert, and RETURNING makes SQLAlchemy send one huge
        # statement that psycopg re-parses every time (7x the CPU). Counting the keys already there first, with
        # one array parameter, is cheap; nothing else writes these keys meanwhile (a key has one partition).
        col = table.c[key[0]]
        ids = list({row[key[0]] for row in rows})
        existing = conn.execute(select(func.count()).select_from(table).where(
            key_in(conn.dialect.name, col, ids))).scalar_one()
        conn.execute(stmt, list(rows))
        return len(ids) - existing
    return len(conn.execute(stmt.returning(*(table.c[k] for k in key)), list(rows)).all())


def as_utc(ts: datetime) -> datetime:
    """A stored timestamp as an aware UTC datetime: SQLite hands back naive ones (everything is written in UTC),
    PostgreSQL aware ones."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
