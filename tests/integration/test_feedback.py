"""Feedback end to end on real processes: HTTP → gateway → gRPC collector → Kafka → materializer → store,
on SQLite and on PostgreSQL (each test runs once per backend)."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
from kafka import KafkaProducer
from sqlalchemy import func, select

from alignloop import credentials
from alignloop.credentials import key_hash
from alignloop.store.schema import Completion, DeadLetter, Feedback
from alignloop.topics import COMPLETIONS_V1, FEEDBACK_V1

pytestmark = pytest.mark.integration


def stored(fs, feedback_ids: list[str], timeout: float = 30) -> dict[str, Feedback]:
    """Waits until every id is in the store; returns the rows by id."""
    deadline = time.monotonic() + timeout
    while True:
        with fs.engine.connect() as conn:
            rows = conn.execute(select(Feedback).where(Feedback.feedback_id.in_(feedback_ids))).all()
        found = {r.feedback_id: r for r in rows}
        if len(found) == len(set(feedback_ids)) or time.monotonic() > deadline:
            assert set(found) == set(feedback_ids), f"missing from the store: {set(feedback_ids) - set(found)}"
            return found
        time.sleep(0.1)


def count_where(fs, *conditions) -> int:
    with fs.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(Feedback).where(*conditions)).scalar_one()


@pytest.fixture
def answers(fstack):
    """Two prompts with three stored answers each, owned by the default application key."""
    ids = fstack.produce_completions(fstack.key(), [f"prompt {uuid.uuid4()}", f"prompt {uuid.uuid4()}"], n=3)
    fstack.wait_stored_completions([i for group in ids for i in group])
    return ids


def test_every_kind_is_stored_once_with_what_was_said(fstack, answers):
    a, b = answers
    bodies = [
        {"kind": "thumbs", "completion_id": a[0], "value": "up", "comment": "clear and right"},
        {"kind": "thumbs", "completion_id": a[1], "value": "down", "flags": {"hallucination": True}},
        {"kind": "rating", "completion_id": a[2], "value": 6},
        {"kind": "ranking", "completion_ids": [a[2], a[0], a[1]]},
        {"kind": "comparison", "completion_ids": [b[0], b[1]], "preferred": b[1],
         "correction": "What I wanted.", "flags": {"fails_instruction": True, "inappropriate": True}},
    ]
    results = []
    for body in bodies:
        r = fstack.post("/v1/feedback", body)
        assert r.status_code == 200, r.text
        results.append(r.json())
    assert len({r["feedback_id"] for r in results}) == len(bodies)
    assert [r["kind"] for r in results] == ["thumbs", "thumbs", "rating", "ranking", "comparison"]
    assert results[3]["completion_ids"] == [a[2], a[0], a[1]]

    rows = stored(fstack, [r["feedback_id"] for r in results])
    up, down, rating, ranking, comparison = (rows[r["feedback_id"]] for r in results)
    assert (up.kind, up.thumbs_up, up.comment, up.completion_ids) == ("thumbs", True, "clear and right", [a[0]])
    assert (down.thumbs_up, down.hallucination, down.fails_instruction) == (False, True, False)
    assert (rating.kind, rating.rating, rating.thumbs_up) == ("rating", 6, None)
    assert ranking.completion_ids == [a[2], a[0], a[1]] and ranking.completion_id == a[2]
    assert (comparison.preferred_completion_id, comparison.correction) == (b[1], "What I wanted.")
    assert comparison.fails_instruction and comparison.inappropriate and not comparison.hallucination
    # Bound to the answers and the application: prompt, owner and model version come from the completions.
    with fstack.engine.connect() as conn:
        prompt_of = dict(conn.execute(select(Completion.completion_id, Completion.prompt_hash)).all())
    for row in rows.values():
        assert row.api_key_hash == key_hash(fstack.key())
        assert row.prompt_hash == prompt_of[row.completion_ids[0]]
        assert row.model_name == "alignloop-policy" and row.model_versions == ["1"] * len(row.completion_ids)
    assert count_where(fstack, Feedback.feedback_id.in_(list(rows))) == len(bodies)


def test_a_batch_is_stored_whole_or_not_at_all(fstack, answers):
    a, b = answers
    marker = f"batch {uuid.uuid4()}"
    good = [{"kind": "thumbs", "completion_id": cid, "value": "up", "comment": marker} for cid in a + b]
    trace = f"batch-{uuid.uuid4()}"
    r = fstack.post("/v1/feedback/batch", {"items": good}, **{"X-Request-Id": trace})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["completion_ids"][0] for d in data] == a + b
    stored(fstack, [d["feedback_id"] for d in data])
    # Every item keeps the id of the request that carried them: the store finds them by it.
    assert count_where(fstack, Feedback.request_id == trace) == len(good)

    rejected = f"rejected {uuid.uuid4()}"
    bad = [{"kind": "thumbs", "completion_id": a[0], "value": "up", "comment": rejected},
           {"kind": "rating", "completion_id": "cmpl-does-not-exist", "value": 3, "comment": rejected}]
    r = fstack.post("/v1/feedback/batch", {"items": bad})
    assert r.status_code == 404, r.text
    assert r.json()["error"]["param"] == "items[1].completion_id"
    # Give anything that was (wrongly) produced time to land, then check nothing did.
    marker_after = fstack.post("/v1/feedback", {"kind": "thumbs", "completion_id": a[0], "value": "down"}).json()
    stored(fstack, [marker_after["feedback_id"]])
    time.sleep(0.5)
    assert count_where(fstack, Feedback.comment == rejected) == 0


@pytest.mark.parametrize("how", ["header", "body"])
def test_a_retry_with_the_same_key_and_body_returns_the_first_result(fstack, answers, how):
    a, _ = answers
    key = f"retry-{uuid.uuid4()}"
    body = {"kind": "ranking", "completion_ids": a}
    headers = {}
    if how == "header":
        headers["Idempotency-Key"] = key
    else:
        body["feedback_id"] = key
    first = fstack.post("/v1/feedback", body, **headers)
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    stored(fstack, [first.json()["feedback_id"]])
    time.sleep(1.1)  # a later second, so a re-created result would show in `created`
    again = fstack.post("/v1/feedback", body, **headers)
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    time.sleep(0.5)
    assert count_where(fstack, Feedback.feedback_id == first.json()["feedback_id"]) == 1
    # Each request had its own X-Request-Id (the gateway's); the stored feedback keeps the first one's.
    with fstack.engine.connect() as conn:
        kept = conn.execute(select(Feedback.request_id).where(
            Feedback.feedback_id == first.json()["feedback_id"])).scalar_one()
    assert kept == first.headers["x-request-id"] != again.headers["x-request-id"]
    if how == "body":
        assert first.json()["client_feedback_id"] == key


@pytest.mark.parametrize("how", ["header", "body"])
def test_the_same_key_with_a_different_body_is_409(fstack, answers, how):
    a, _ = answers
    key = f"conflict-{uuid.uuid4()}"
    body = {"kind": "thumbs", "completion_id": a[0], "value": "up"}
    headers = {"Idempotency-Key": key} if how == "header" else {}
    if how == "body":
        body["feedback_id"] = key
    assert fstack.post("/v1/feedback", body, **headers).status_code == 200
    r = fstack.post("/v1/feedback", {**body, "value": "down"}, **headers)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["param"] == ("Idempotency-Key" if how == "header" else "feedback_id")
    assert r.json()["error"]["code"] == "idempotency_key_reused"


def test_a_key_is_scoped_to_its_application(fstack, answers):
    """Two tenants choosing the same idempotency key do not collide."""
    a, _ = answers
    (b_answer,), = fstack.produce_completions(fstack.key("tenant-b"), [f"b {uuid.uuid4()}"])
    fstack.wait_stored_completions([b_answer])
    key = f"shared-{uuid.uuid4()}"
    mine = fstack.post("/v1/feedback", {"kind": "thumbs", "completion_id": a[0], "value": "up"},
                       **{"Idempotency-Key": key})
    theirs = fstack.post("/v1/feedback", {"kind": "thumbs", "completion_id": b_answer, "value": "down"},
                         app="tenant-b", **{"Idempotency-Key": key})
    assert mine.status_code == theirs.status_code == 200
    assert mine.json()["feedback_id"] != theirs.json()["feedback_id"]


def test_another_applications_completions_do_not_exist_for_you(fstack, answers):
    a, _ = answers
    foreign = fstack.post("/v1/feedback", {"kind": "thumbs", "completion_id": a[0], "value": "down"},
                          app="tenant-b")
    missing = fstack.post("/v1/feedback", {"kind": "thumbs", "completion_id": "cmpl-nope", "value": "down"},
                          app="tenant-b")
    assert foreign.status_code == missing.status_code == 404
    # The same answer as for an id that never existed: nothing tells the tenant the id is real.
    assert foreign.json()["error"]["message"].replace(a[0], "X") == missing.json()["error"]["message"].replace(
        "cmpl-nope", "X")
    (own,), = fstack.produce_completions(fstack.key("tenant-b"), [f"b {uuid.uuid4()}"])
    fstack.wait_stored_completions([own])
    mixed = fstack.post("/v1/feedback", {"kind": "comparison", "completion_ids": [own, a[1]], "preferred": own},
                        app="tenant-b")
    assert mixed.status_code == 404 and mixed.json()["error"]["param"] == "completion_ids[1]"


def key_works(fs, key: str) -> bool:
    """Whether the gateway takes `key`: an empty body is a 400 after the key check, a 401 before it."""
    status = fs.post("/v1/feedback", b"[]", Authorization=f"Bearer {key}").status_code
    assert status in (400, 401), status
    return status == 400


def wait_until(predicate, timeout: float = 10) -> None:
    """The gateway re-reads the credentials file at most once a second."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the gateway did not follow the credentials file"
        time.sleep(0.1)


def test_a_rotated_key_keeps_its_tenant_its_old_key_works_for_the_grace_and_revoking_stops_it(fstack):
    app, path = f"rotating-{uuid.uuid4().hex[:8]}", fstack.settings.credentials_path
    old = credentials.add_app(path, app)
    (served,), = fstack.produce_completions(old, [f"before the rotation {uuid.uuid4()}"])
    fstack.wait_stored_completions([served])
    wait_until(lambda: key_works(fstack, old))
    new = credentials.rotate(path, app, grace_s=600)
    wait_until(lambda: key_works(fstack, new))

    # The new key is the same tenant: it sees the answer served under the old one, and an idempotency key
    # used with both keys names one piece of feedback.
    body, idem = {"kind": "thumbs", "completion_id": served, "value": "up"}, f"rot-{uuid.uuid4()}"
    with_new = fstack.post("/v1/feedback", body, Authorization=f"Bearer {new}", **{"Idempotency-Key": idem})
    with_old = fstack.post("/v1/feedback", body, Authorization=f"Bearer {old}", **{"Idempotency-Key": idem})
    assert with_new.status_code == with_old.status_code == 200, (with_new.text, with_old.text)
    assert with_new.json()["feedback_id"] == with_old.json()["feedback_id"]
    row = stored(fstack, [with_new.json()["feedback_id"]])[with_new.json()["feedback_id"]]
    assert row.api_key_hash == key_hash(old)
    metrics = httpx.get(f"{fstack.gateway}/metrics", headers=fstack.operator_headers()).text
    assert f'alignloop_gateway_retiring_key_requests_total{{name="{app}"}}' in metrics

    # No grace (a leaked key): every earlier key stops at once, the newest works.
    newest = credentials.rotate(path, app, grace_s=0)
    wait_until(lambda: not key_works(fstack, old) and not key_works(fstack, new))
    assert key_works(fstack, newest)
    assert fstack.post("/v1/feedback", {**body, "value": "down"},
                       Authorization=f"Bearer {newest}").status_code == 200

    credentials.revoke(path, app)
    wait_until(lambda: not key_works(fstack, newest))
    assert key_works(fstack, fstack.key())  # the other applications are untouched


def test_a_completion_recorded_after_the_feedback_arrives_is_waited_for(fstack):
    """Feedback sent the instant an answer is served may reach the collector before the completion record
    reaches the store: it is accepted once the record lands (within feedback_completion_wait_s)."""
    (cid,), = fstack.produce_completions(fstack.key(), [f"fresh {uuid.uuid4()}"])  # not waited for
    r = fstack.post("/v1/feedback", {"kind": "rating", "completion_id": cid, "value": 7})
    assert r.status_code == 200, r.text


def test_feedback_consumed_before_its_completion_record_is_kept(fstack):
    """The materializer must not drop feedback whose completion it has not seen (no foreign key, no filter)."""
    producer = KafkaProducer(bootstrap_servers=fstack.settings.kafka_bootstrap, acks="all")
    fid, cid = f"fb_{uuid.uuid4().hex}", f"cmpl-{uuid.uuid4().hex}"
    record = {"feedback_id": fid, "request_hash": "h", "api_key_hash": key_hash(fstack.key()), "kind": "thumbs",
              "completion_ids": [cid], "thumbs_up": True, "prompt_hash": "p", "model_name": "alignloop-policy",
              "model_versions": ["1"], "created_at": time.time(), "accepted_at": time.time()}
    producer.send(FEEDBACK_V1, key=fid.encode(), value=json.dumps(record).encode()).get(10)
    producer.close()
    row = stored(fstack, [fid])[fid]
    assert row.completion_id == cid and row.thumbs_up is True
    with fstack.engine.connect() as conn:
        assert conn.execute(select(func.count()).where(Completion.completion_id == cid)).scalar_one() == 0


def test_an_unreadable_record_becomes_a_dead_letter_and_the_rest_flows(fstack, answers):
    producer = KafkaProducer(bootstrap_servers=fstack.settings.kafka_bootstrap, acks="all")
    garbage = f"not json {uuid.uuid4()}".encode()
    md = producer.send(COMPLETIONS_V1, key=b"bad", value=garbage).get(10)
    producer.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with fstack.engine.connect() as conn:
            hit = conn.execute(select(DeadLetter).where(DeadLetter.topic == COMPLETIONS_V1,
                                                        DeadLetter.kafka_partition == md.partition,
                                                        DeadLetter.kafka_offset == md.offset)).first()
        if hit:
            break
        time.sleep(0.1)
    assert hit is not None and hit.value == garbage and hit.error
    r = fstack.post("/v1/feedback", {"kind": "thumbs", "completion_id": answers[0][0], "value": "up"})
    stored(fstack, [r.json()["feedback_id"]])


def test_operators_see_counts_and_thumbs_up_rate_per_model_version_and_day(fstack):
    version = f"v{uuid.uuid4().hex[:8]}"
    (x, y, z), = fstack.produce_completions(fstack.key(), [f"stats {uuid.uuid4()}"], n=3, model_version=version)
    fstack.wait_stored_completions([x, y, z])
    items = [{"kind": "thumbs", "completion_id": x, "value": "up"},
             {"kind": "thumbs", "completion_id": y, "value": "up"},
             {"kind": "thumbs", "completion_id": z, "value": "down"},
             {"kind": "rating", "completion_id": x, "value": 7},
             {"kind": "rating", "completion_id": z, "value": 2},
             {"kind": "ranking", "completion_ids": [x, y, z], "correction": "better"}]
    r = fstack.post("/v1/feedback/batch", {"items": items})
    assert r.status_code == 200, r.text
    stored(fstack, [d["feedback_id"] for d in r.json()["data"]])

    assert httpx.get(f"{fstack.gateway}/v1/admin/feedback/stats", headers=fstack.headers()).status_code == 403
    r = httpx.get(f"{fstack.gateway}/v1/admin/feedback/stats", headers=fstack.operator_headers())
    assert r.status_code == 200, r.text
    stats = r.json()
    (mine,) = [s for s in stats["by_model_version"] if s["model_version"] == version]
    assert (mine["total"], mine["thumbs_up"], mine["thumbs_down"], mine["ratings"], mine["rankings"],
            mine["corrections"]) == (6, 2, 1, 2, 1, 1)
    assert mine["thumbs_up_rate"] == pytest.approx(2 / 3) and mine["rating_mean"] == pytest.approx(4.5)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    (per_day,) = [s for s in stats["by_model_version_and_day"] if s["model_version"] == version]
    assert per_day["day"] == today and per_day["total"] == 6
    assert any(d["day"] == today and d["total"] >= 6 for d in stats["by_day"])
    bad = httpx.get(f"{fstack.gateway}/v1/admin/feedback/stats?days=-1", headers=fstack.operator_headers())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "days"


def test_operators_see_each_tenants_requests_and_tokens_counting_a_prompt_once(fstack, monkeypatch, capsys):
    tag = uuid.uuid4().hex[:8]
    heavy, light, gone = f"usage-heavy-{tag}", f"usage-light-{tag}", f"usage-gone-{tag}"
    keys = {name: fstack.key(name) for name in (heavy, light, gone)}
    # Each record here: 5 prompt tokens, 3 completion tokens (FeedbackStack.produce_completions).
    served = fstack.produce_completions(keys[heavy], [f"a {tag}", f"b {tag}"], n=3, cached_tokens=4)
    served += fstack.produce_completions(keys[heavy], [f"f {tag}"], cached_tokens=0)
    served += fstack.produce_completions(keys[light], [f"c {tag}"])  # a record from before cached tokens
    served += fstack.produce_completions(keys[light], [f"d {tag}"], created_at=time.time() - 3 * 86400)
    served += fstack.produce_completions(keys[gone], [f"e {tag}"], n=2)
    fstack.wait_stored_completions([c for group in served for c in group])
    credentials.revoke(fstack.settings.credentials_path, gone)

    def report(days: int) -> dict:
        r = httpx.get(f"{fstack.gateway}/v1/admin/usage", params={"days": days}, headers=fstack.operator_headers())
        assert r.status_code == 200, r.text
        return r.json()

    def tenant(rep: dict, name: str) -> dict:
        (row,) = [t for t in rep["by_tenant"] if t["tenant"] == key_hash(keys[name])]
        return row

    # Until the gateway re-reads the credentials file (within a second), the new tenants have no name there.
    wait_until(lambda: tenant(report(1), heavy)["name"] == heavy)
    today = report(1)
    h = tenant(today, heavy)
    # Two requests of three choices and one of one: each prompt (and its cached part) counted once, every
    # choice's tokens.
    assert (h["name"], h["requests"], h["completions"], h["prompt_tokens"], h["cached_prompt_tokens"],
            h["completion_tokens"], h["total_tokens"]) == (heavy, 3, 7, 15, 8, 21, 36)
    light_today = tenant(today, light)
    assert (light_today["requests"], light_today["cached_prompt_tokens"], light_today["total_tokens"]) == (1, 0, 8)
    wait_until(lambda: tenant(report(1), gone)["name"] is None)  # revoked: its usage stays, unnamed
    assert tenant(report(0), light)["requests"] == 2  # all time takes in the request of three days ago
    day = time.strftime("%Y-%m-%d", time.gmtime())
    mine = [d for d in today["by_tenant_and_day"] if d["tenant"] == key_hash(keys[heavy])]
    assert [(d["day"], d["requests"], d["cached_prompt_tokens"]) for d in mine] == [(day, 3, 8)]
    days = [d["day"] for d in report(0)["by_tenant_and_day"]]
    assert days == sorted(days)

    assert httpx.get(f"{fstack.gateway}/v1/admin/usage", headers=fstack.headers()).status_code == 403
    bad = httpx.get(f"{fstack.gateway}/v1/admin/usage?days=-1", headers=fstack.operator_headers())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "days"

    # The command line, through the same route.
    from alignloop import cli

    monkeypatch.setenv("ALIGNLOOP_HOME", str(fstack.settings.home))
    monkeypatch.setenv("ALIGNLOOP_GATEWAY_PORT", str(fstack.settings.gateway_port))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["usage", "--days", "1", "--json"])
    assert exit_.value.code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tenant(printed, heavy)["total_tokens"] == 36


def test_every_feedback_route_needs_a_key(fstack):
    for path in ("/v1/feedback", "/v1/feedback/batch"):
        assert httpx.post(f"{fstack.gateway}{path}", json={}).status_code == 401
    assert httpx.get(f"{fstack.gateway}/v1/admin/feedback/stats").status_code == 401


# ---- bad input: a 4xx naming the field, and nothing stored ---------------------------------------------------
BAD_SINGLE = [
    (b"", 400, "body"),
    (b"   ", 400, "body"),
    (b"{not json", 400, "body"),
    (b"[]", 400, "body"),
    ({"completion_id": "A", "value": "up"}, 400, "kind"),
    ({"kind": "smile", "completion_id": "A", "value": "up"}, 400, "kind"),
    ({"kind": "thumbs", "value": "up"}, 400, "completion_id"),
    ({"kind": "thumbs", "completion_id": "A", "value": "sideways"}, 400, "value"),
    ({"kind": "thumbs", "completion_id": "", "value": "up"}, 400, "completion_id"),
    ({"kind": "rating", "completion_id": "A", "value": 0}, 400, "value"),
    ({"kind": "rating", "completion_id": "A", "value": 8}, 400, "value"),
    ({"kind": "rating", "completion_id": "A", "value": 3.5}, 400, "value"),
    ({"kind": "rating", "completion_id": "A", "value": "5"}, 400, "value"),
    ({"kind": "rating", "completion_id": "A", "value": True}, 400, "value"),
    ({"kind": "ranking", "completion_ids": ["A"]}, 400, "completion_ids"),
    ({"kind": "ranking", "completion_ids": ["A", "B", "A"]}, 400, "completion_ids"),
    ({"kind": "ranking", "completion_ids": [f"C{i}" for i in range(17)]}, 400, "completion_ids"),
    ({"kind": "comparison", "completion_ids": ["A", "B"], "preferred": "C"}, 400, "preferred"),
    ({"kind": "comparison", "completion_ids": ["A", "B", "C"], "preferred": "A"}, 400, "completion_ids"),
    ({"kind": "comparison", "completion_ids": ["A", "A"], "preferred": "A"}, 400, "completion_ids"),
    ({"kind": "thumbs", "completion_id": "A", "value": "up", "colour": "red"}, 400, "colour"),
    ({"kind": "thumbs", "completion_id": "A", "value": "up", "flags": {"rude": True}}, 400, "flags.rude"),
    ({"kind": "thumbs", "completion_id": "A", "value": "up", "comment": "x" * 20_001}, 400, "comment"),
    ({"kind": "thumbs", "completion_id": "A", "value": "up", "feedback_id": ""}, 400, "feedback_id"),
    ({"kind": "thumbs", "completion_id": "A", "value": "up", "comment": "x" * (1 << 20)}, 413, "body"),
]


@pytest.mark.parametrize("body,status,param", BAD_SINGLE, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD_SINGLE)])
def test_bad_feedback_is_refused_naming_the_field(fstack, answers, body, status, param):
    body = json.loads(json.dumps(body).replace('"A"', json.dumps(answers[0][0]))
                      .replace('"B"', json.dumps(answers[0][1]))) if isinstance(body, dict) else body
    r = fstack.post("/v1/feedback", body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text


BAD_BATCH = [
    ({}, 400, "items"),
    ({"items": []}, 400, "items"),
    ({"items": {"kind": "thumbs"}}, 400, "items"),
    ({"items": [{"kind": "thumbs", "completion_id": "A", "value": "up"}] * 1001}, 400, "items"),
    ({"items": [{"kind": "thumbs", "completion_id": "A", "value": "up"},
                {"kind": "rating", "completion_id": "A", "value": 9}]}, 400, "items[1].value"),
    ({"items": [{"kind": "thumbs", "completion_id": "A", "value": "up", "feedback_id": "same"},
                {"kind": "thumbs", "completion_id": "A", "value": "up", "feedback_id": "same"}]},
     400, "items[1].feedback_id"),
    ({"items": [{"kind": "thumbs", "completion_id": "A", "value": "up"},
                {"kind": "ranking", "completion_ids": ["A", "OTHER"]}]}, 400, "items[1].completion_ids"),
]


@pytest.mark.parametrize("body,status,param", BAD_BATCH, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD_BATCH)])
def test_bad_batches_are_refused_naming_the_item_and_field(fstack, answers, body, status, param):
    a, b = answers
    text = json.dumps(body).replace('"A"', json.dumps(a[0])).replace('"OTHER"', json.dumps(b[0]))
    r = fstack.post("/v1/feedback/batch", text)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_ranked_answers_to_different_prompts_are_refused(fstack, answers):
    a, b = answers
    r = fstack.post("/v1/feedback", {"kind": "ranking", "completion_ids": [a[0], b[0]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "completion_ids", r.text


def test_a_training_snapshot_of_the_live_store(fstack, tmp_path):
    """`alignloop feedback export` on the store the services write (SQLite and PostgreSQL's JSONB alike)."""
    import pandas as pd

    from pipelines.feedback_export import export_feedback

    (a, b, c, d), = fstack.produce_completions(fstack.key(), [f"export {uuid.uuid4()}"], n=4)
    fstack.wait_stored_completions([a, b, c, d])
    items = [{"kind": "ranking", "completion_ids": [c, a, d, b]},
             {"kind": "thumbs", "completion_id": a, "value": "up"},
             {"kind": "thumbs", "completion_id": b, "value": "down", "correction": "Say it better."}]
    r = fstack.post("/v1/feedback/batch", {"items": items})
    assert r.status_code == 200, r.text
    stored(fstack, [x["feedback_id"] for x in r.json()["data"]])

    first = export_feedback(fstack.settings, out=tmp_path / "one", log_mlflow=False)
    again = export_feedback(fstack.settings, out=tmp_path / "two", log_mlflow=False)
    assert first.hash == again.hash  # same store contents, same snapshot
    pairs = pd.read_parquet(first.folder / "pairs.parquet")
    with fstack.engine.connect() as conn:
        prompt = conn.execute(select(Completion.prompt_hash).where(Completion.completion_id == a)).scalar_one()
    mine = pairs[pairs.prompt_hash == prompt]
    ranked = {(p.chosen_completion_id, p.rejected_completion_id) for p in mine[mine.source == "ranking"].itertuples()}
    assert ranked == {(c, a), (c, d), (c, b), (a, d), (a, b), (d, b)}  # all C(4,2), better one chosen
    thumbs = mine[mine.source == "thumbs"]
    assert list(zip(thumbs.chosen_completion_id, thumbs.rejected_completion_id)) == [(a, b)]
    demos = pd.read_parquet(first.folder / "demonstrations.parquet")
    assert demos[demos.completion_id == b].demonstration.tolist() == ["Say it better."]
