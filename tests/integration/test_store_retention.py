"""Retention of the feedback store on real SQLite and PostgreSQL: what each period deletes and keeps, in
batches, the dry run's count; and the materializer applying it on its own, against the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import func, insert, select

from alignloop import store
from alignloop.store.retention import Policy, prune
from alignloop.store.schema import Completion, DeadLetter, Feedback
from tests.conftest import feedback_stack, store_database as database

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


class Rows:
    """Inserts rows as the materializer stores them, dated `days` before NOW."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.offset = 0

    def completion(self, cid: str, days: float, prompt: str = "p", tenant: str = "t1") -> None:
        at = NOW - timedelta(days=days)
        with self.engine.begin() as conn:
            conn.execute(insert(Completion), [{
                "completion_id": cid, "response_id": f"r-{cid}", "choice_index": 0, "api_key_hash": tenant,
                "prompt_hash": prompt, "messages": [{"role": "user", "content": prompt}],
                "response_text": cid,
                "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1, "model_name": "m",
                "model_version": "1", "sampling": {}, "stream": False, "created_at": at, "finished_at": at,
                "ingested_at": at}])

    def feedback(self, fid: str, days: float, cids: list[str], prompt: str = "p", tenant: str = "t1") -> None:
        at = NOW - timedelta(days=days)
        self.offset += 1
        with self.engine.begin() as conn:
            conn.execute(insert(Feedback), [{
                "feedback_id": fid, "request_hash": "h", "api_key_hash": tenant, "kind": "ranking",
                "completion_id": cids[0], "completion_ids": cids, "prompt_hash": prompt, "model_name": "m",
                "model_version": "1", "model_versions": ["1"] * len(cids), "day": at.strftime("%Y-%m-%d"),
                "created_at": at, "accepted_at": at, "ingested_at": at, "kafka_partition": 0,
                "kafka_offset": self.offset}])

    def dead_letter(self, offset: int, days: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(DeadLetter), [{"topic": "t", "kafka_partition": 0, "kafka_offset": offset,
                                               "key": None, "value": b"{", "error": "bad",
                                               "ingested_at": NOW - timedelta(days=days)}])

    def ids(self, table) -> set:
        key = {Completion: Completion.completion_id, Feedback: Feedback.feedback_id,
               DeadLetter: DeadLetter.kafka_offset}[table]
        with self.engine.connect() as conn:
            return set(conn.execute(select(key)).scalars())


@pytest.fixture(params=["sqlite", "postgresql"])
def rows(request, tmp_path) -> Iterator[Rows]:
    with database(request.param, tmp_path) as url:
        store.upgrade(url)
        engine = store.connect(url)
        try:
            yield Rows(engine)
        finally:
            engine.dispose()


def test_the_overall_period_deletes_everything_older_and_keeps_the_rest(rows: Rows):
    for cid, days in (("old", 40), ("edge-in", 29.9), ("new", 1)):
        rows.completion(cid, days)
    rows.feedback("fb-old", 31, ["old"])
    rows.feedback("fb-new", 2, ["new"])
    rows.dead_letter(1, 60)
    rows.dead_letter(2, 5)
    policy = Policy(retention_days=30)
    assert prune(rows.engine, policy, NOW, dry_run=True).as_dict() == {
        "completions": 1, "unlabeled_completions": 0, "feedback": 1, "dead_letters": 1}
    assert rows.ids(Completion) == {"old", "edge-in", "new"}  # a dry run deletes nothing
    assert prune(rows.engine, policy, NOW).as_dict() == {
        "completions": 1, "unlabeled_completions": 0, "feedback": 1, "dead_letters": 1}
    assert rows.ids(Completion) == {"edge-in", "new"}
    assert rows.ids(Feedback) == {"fb-new"} and rows.ids(DeadLetter) == {2}
    assert prune(rows.engine, policy, NOW).as_dict() == {
        "completions": 0, "unlabeled_completions": 0, "feedback": 0, "dead_letters": 0}


def test_unlabeled_answers_go_sooner_and_every_answer_to_a_rated_prompt_stays(rows: Rows):
    rows.completion("rated-1", 20, prompt="ranked")
    rows.completion("rated-2", 20, prompt="ranked")  # in the ranking too
    rows.completion("best-of-unshown", 20, prompt="ranked")  # never shown, same prompt: kept with its group
    rows.feedback("fb", 19, ["rated-1", "rated-2"], prompt="ranked")
    rows.completion("same-prompt-other-tenant", 20, prompt="ranked", tenant="t2")
    rows.completion("unrated-old", 20, prompt="nobody")
    rows.completion("unrated-young", 3, prompt="nobody")
    assert prune(rows.engine, Policy(unlabeled_retention_days=7), NOW).unlabeled_completions == 2
    assert rows.ids(Completion) == {"rated-1", "rated-2", "best-of-unshown", "unrated-young"}
    assert rows.ids(Feedback) == {"fb"}


def test_answers_whose_feedback_expires_become_unlabeled_and_the_dry_run_counts_them(rows: Rows):
    rows.completion("a", 20, prompt="p1")
    rows.feedback("fb-expiring", 40, ["a"], prompt="p1")  # older than 30 days: goes, and with it a's label
    rows.completion("b", 20, prompt="p2")
    rows.feedback("fb-kept", 10, ["b"], prompt="p2")
    policy = Policy(retention_days=30, unlabeled_retention_days=7)
    counted = prune(rows.engine, policy, NOW, dry_run=True)
    assert prune(rows.engine, policy, NOW) == counted
    assert counted.as_dict() == {"completions": 0, "unlabeled_completions": 1, "feedback": 1,
                                 "dead_letters": 0}
    assert rows.ids(Completion) == {"b"}


def test_large_deletes_go_in_batches(rows: Rows):
    for i in range(23):
        rows.completion(f"c{i:02d}", 50)
    batches = []
    pruned = prune(rows.engine, Policy(retention_days=30), NOW, batch_size=5,
                   on_batch=lambda kind, n: batches.append((kind, n)))
    assert pruned.completions == 23 and not rows.ids(Completion)
    assert batches == [("completions", 5)] * 4 + [("completions", 3)]


def test_the_store_prune_command(rows: Rows, tmp_path):
    rows.completion("old", 40)
    rows.completion("new", 1)
    url = rows.engine.url.render_as_string(hide_password=False)
    env = {**os.environ, "ALIGNLOOP_HOME": str(tmp_path), "ALIGNLOOP_STORE_URL": url}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "alignloop.cli", "store", "prune", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    nothing = run()
    assert nothing.returncode == 2 and "ALIGNLOOP_STORE_RETENTION_DAYS" in nothing.stdout + nothing.stderr
    dry = run("--retention-days", "30", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout.strip().splitlines()[-1]) == {
        "dry_run": True, "completions": 1, "unlabeled_completions": 0, "feedback": 0, "dead_letters": 0}
    assert rows.ids(Completion) == {"old", "new"}
    done = run("--retention-days", "30")
    assert json.loads(done.stdout.strip().splitlines()[-1])["completions"] == 1
    assert rows.ids(Completion) == {"new"}
    assert run("--retention-days", "-1").returncode == 2


def test_the_materializer_prunes_on_its_own_and_does_not_store_a_replayed_expired_record(tmp_path):
    with feedback_stack(tmp_path, "sqlite", store_retention_days=30, store_prune_interval_s=1) as fs:
        Rows(fs.engine).completion("already-stored-and-old", 45)
        (old,), = fs.produce_completions(fs.key(), [f"replayed {uuid.uuid4()}"],
                                         created_at=(NOW - timedelta(days=90)).timestamp())
        (fresh,), = fs.produce_completions(fs.key(), [f"fresh {uuid.uuid4()}"])
        fs.wait_stored_completions([fresh])
        deadline = time.monotonic() + 30
        while "already-stored-and-old" in Rows(fs.engine).ids(Completion):
            assert time.monotonic() < deadline, "the materializer did not apply the retention period"
            time.sleep(0.2)
        with fs.engine.connect() as conn:
            assert conn.execute(select(func.count()).where(Completion.completion_id == old)).scalar_one() == 0
        metrics = httpx.get(f"http://127.0.0.1:{fs.settings.materializer_port}/metrics").text
        assert 'alignloop_store_pruned_rows_total{kind="completions"} 1.0' in metrics
        expired = 'alignloop_store_records_total{outcome="expired",topic="alignloop.completions.v1"} 1.0'
        assert expired in metrics
