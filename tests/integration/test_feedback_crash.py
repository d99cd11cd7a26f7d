"""Nothing acknowledged is lost or stored twice when the materializer or the collector is `kill -9`ed in the
middle of 10,000 events, on SQLite and on PostgreSQL."""

from __future__ import annotations

import re
import threading
import time
import uuid

import httpx
import pytest
from sqlalchemy import func, select

from alignloop.store.schema import Feedback
from tests.conftest import feedback_stack, wait_for

pytestmark = pytest.mark.integration

EVENTS = 10_000
BATCH = 50


def stored_ids(fs, marker: str) -> list[str]:
    with fs.engine.connect() as conn:
        return list(conn.execute(select(Feedback.feedback_id).where(Feedback.comment == marker)).scalars())


def stored_count(fs, marker: str) -> int:
    with fs.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(Feedback).where(Feedback.comment == marker)).scalar_one()


class Clients:
    """Threads posting EVENTS thumbs in batches, each batch under its own Idempotency-Key, retrying the same
    key and body on any failure until it is acknowledged: what a well-behaved client does."""

    def __init__(self, fs, completion_ids: list[str], marker: str, threads: int = 4) -> None:
        self.fs = fs
        self.marker = marker
        self.acked: dict[str, list[str]] = {}  # idempotency key -> feedback ids
        self.retries = 0
        self.conflicts: list[str] = []
        self._lock = threading.Lock()
        batches = []
        for start in range(0, EVENTS, BATCH):
            items = [{"kind": "thumbs", "completion_id": completion_ids[(start + i) % len(completion_ids)],
                      "value": "up" if (start + i) % 3 else "down", "comment": marker} for i in range(BATCH)]
            batches.append((f"{marker}-{start}", items))
        self._threads = [threading.Thread(target=self._run, args=(batches[i::threads],), daemon=True)
                         for i in range(threads)]

    def start(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self._threads), "clients did not finish"

    @property
    def acked_events(self) -> int:
        with self._lock:
            return sum(len(v) for v in self.acked.values())

    def _run(self, batches) -> None:
        headers = {**self.fs.headers(), "Content-Type": "application/json"}
        with httpx.Client(base_url=self.fs.gateway, timeout=60) as http:
            for key, items in batches:
                while True:
                    try:
                        r = http.post("/v1/feedback/batch", json={"items": items},
                                      headers={**headers, "Idempotency-Key": key})
                    except httpx.HTTPError:
                        r = None
                    if r is not None and r.status_code == 200:
                        with self._lock:
                            self.acked[key] = [d["feedback_id"] for d in r.json()["data"]]
                        break
                    if r is not None and r.status_code == 409:
                        self.conflicts.append(key)
                        break
                    with self._lock:
                        self.retries += 1
                    time.sleep(0.05)


def _answers(fs, n: int = 200) -> list[str]:
    ids = [g[0] for g in fs.produce_completions(fs.key(), [f"crash {uuid.uuid4()}" for _ in range(n)])]
    fs.wait_stored_completions(ids)
    return ids


def _assert_exactly_once(fs, clients: Clients, marker: str) -> None:
    acked = [fid for ids in clients.acked.values() for fid in ids]
    assert not clients.conflicts
    assert len(acked) == len(set(acked)) == EVENTS
    wait_for(lambda: stored_count(fs, marker) >= EVENTS, 120, "every acknowledged event in the store")
    time.sleep(1.0)  # anything duplicated would have landed by now
    stored = stored_ids(fs, marker)
    assert len(stored) == EVENTS, f"{len(stored) - EVENTS:+d} rows beyond the acknowledged events"
    assert set(stored) == set(acked)


def _metric(fs, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{fs.settings.materializer_port}/metrics").text
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) == labels:
            return float(m.group(2))
    return 0.0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_of_the_materializer_mid_stream_loses_and_duplicates_nothing(tmp_path, backend):
    with feedback_stack(tmp_path, backend) as fs:
        marker = f"materializer-crash-{uuid.uuid4().hex[:8]}"
        clients = Clients(fs, _answers(fs), marker).start()
        wait_for(lambda: stored_count(fs, marker) >= 1000, 60, "the materializer to be under way")
        fs.kill("materializer")  # SIGKILL: no flush, no offset commit, no goodbye to the group
        at_kill = stored_count(fs, marker)
        assert at_kill < EVENTS, "the stream ended before the kill; the test proves nothing"
        fs.start("materializer")
        clients.join(120)
        _assert_exactly_once(fs, clients, marker)

        # Redelivery is harmless: a materializer in a new consumer group re-reads both topics from the start,
        # and every record it sees is already stored.
        fs.kill("materializer", 15)
        fs.settings.feedback_consumer_group = f"replay-{uuid.uuid4().hex[:6]}"
        fs.start("materializer")
        wait_for(lambda: _metric(fs, "alignloop_store_records_total", topic="alignloop.feedback.v1",
                                 outcome="duplicate") >= EVENTS, 120, "the replay to re-read everything")
        assert _metric(fs, "alignloop_store_records_total", topic="alignloop.feedback.v1", outcome="inserted") == 0
        assert stored_count(fs, marker) == EVENTS


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_of_the_collector_while_clients_retry_loses_and_duplicates_nothing(tmp_path, backend):
    with feedback_stack(tmp_path, backend) as fs:
        marker = f"collector-crash-{uuid.uuid4().hex[:8]}"
        clients = Clients(fs, _answers(fs), marker).start()
        wait_for(lambda: clients.acked_events >= 2000, 60, "the clients to be under way")
        fs.kill("feedback")
        at_kill = clients.acked_events
        assert at_kill < EVENTS, "the clients finished before the kill; the test proves nothing"
        time.sleep(1.0)  # clients meet a dead collector for a while
        fs.start("feedback")
        clients.join(180)
        _assert_exactly_once(fs, clients, marker)


def test_materializers_in_one_group_share_the_partitions_and_store_each_event_once(tmp_path):
    """The consumer side scales by partitions: a second materializer joins the group, takes some of the three
    partitions, and between them every event is stored exactly once."""
    import dataclasses

    from tests.conftest import free_port

    with feedback_stack(tmp_path, "sqlite") as fs:
        second = dataclasses.replace(fs, settings=fs.settings.model_copy(update={"materializer_port": free_port()}),
                                     procs={}, _producer=None, _engine=None)
        second.start("materializer")
        try:
            marker = f"group-{uuid.uuid4().hex[:8]}"
            time.sleep(6)  # let the group settle with two members (Tansu joins in about half a session timeout)
            clients = Clients(fs, _answers(fs), marker).start()
            clients.join(120)
            _assert_exactly_once(fs, clients, marker)
            first_share = _metric(fs, "alignloop_store_records_total", topic="alignloop.feedback.v1",
                                  outcome="inserted")
            second_share = _metric(second, "alignloop_store_records_total", topic="alignloop.feedback.v1",
                                   outcome="inserted")
            assert first_share > 0 and second_share > 0, (first_share, second_share)
            assert first_share + second_share == EVENTS
        finally:
            second.kill("materializer", 15)


def test_feedback_waiting_for_an_unknown_completion_holds_up_no_one_else(tmp_path):
    """Single requests share collector calls; one naming a completion that is not stored (yet) waits on its
    own, so everybody else's feedback goes through meanwhile."""
    import concurrent.futures

    with feedback_stack(tmp_path, "sqlite", feedback_completion_wait_s=10.0) as fs:
        answers = _answers(fs, 20)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # Its client waits longer than the collector's 10 s: the answer (404) must not race the timeout.
            stuck = pool.submit(fs.post, "/v1/feedback", {"kind": "thumbs", "completion_id": "cmpl-unknown",
                                                          "value": "up"}, timeout=90)
            time.sleep(0.5)  # it is inside the collector now, waiting for a record that will not come
            for cid in answers:
                r = fs.post("/v1/feedback", {"kind": "thumbs", "completion_id": cid, "value": "up"})
                assert r.status_code == 200, r.text
            assert not stuck.done(), "the unknown id was answered before the 10 s wait: nothing was proven"
            assert stuck.result(60).status_code == 404
