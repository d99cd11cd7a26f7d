"""The whole loop's first half on the full stack (`alignloop up`, real vLLM): a chat answer, then feedback on
it through the official SDK's HTTP client, then the feedback and its completion in the store, joined."""

from __future__ import annotations

import time

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from alignloop import store
from alignloop.credentials import key_hash
from alignloop.store.schema import Completion, Feedback

pytestmark = pytest.mark.integration


def test_feedback_on_served_answers_lands_in_the_store_bound_to_them(stack, openai_client):
    resp = openai_client.chat.completions.create(
        model="alignloop-policy", messages=[{"role": "user", "content": "Rank these answers."}], n=3,
        max_tokens=8, temperature=1.0, seed=7, extra_headers={"X-Request-Id": "app-trace-7"})
    assert resp._request_id == "app-trace-7"  # the SDK reads it from the response's x-request-id
    ids = [c.completion_id for c in resp.choices]
    app_key = stack.credentials["app_key"]
    headers = {"Authorization": f"Bearer {app_key}"}
    # Sent at once: the collector waits for the completion records to reach the store.
    ranking = httpx.post(f"{stack.gateway}/v1/feedback", headers={**headers, "X-Request-Id": "app-rank-7"},
                         timeout=30, json={"kind": "ranking", "completion_ids": ids[::-1]})
    assert ranking.status_code == 200, ranking.text
    assert ranking.headers["x-request-id"] == "app-rank-7"
    thumbs = httpx.post(f"{stack.gateway}/v1/feedback", headers=headers, timeout=30,
                        json={"kind": "thumbs", "completion_id": ids[0], "value": "down",
                              "correction": "A better answer."})
    assert thumbs.status_code == 200, thumbs.text

    engine = store.connect(f"sqlite:///{stack.home / 'feedback.db'}")
    try:
        deadline = time.monotonic() + 30
        wanted = {ranking.json()["feedback_id"], thumbs.json()["feedback_id"]}
        while True:
            with Session(engine) as session:
                rows = session.execute(select(Feedback, Completion).join(
                    Completion, Completion.completion_id == Feedback.completion_id).where(
                    Feedback.feedback_id.in_(wanted))).all()
            if len(rows) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        engine.dispose()
    assert len(rows) == 2
    by_kind = {fb.kind: (fb, c) for fb, c in rows}
    fb, completion = by_kind["ranking"]
    assert fb.completion_ids == ids[::-1] and completion.completion_id == ids[2]
    assert fb.request_id == "app-rank-7"
    assert completion.response_text == resp.choices[2].message.content
    assert completion.messages == [{"role": "user", "content": "Rank these answers."}]
    assert completion.request_id == "app-trace-7" and completion.response_id == resp.id
    assert fb.api_key_hash == completion.api_key_hash == key_hash(app_key)
    fb, completion = by_kind["thumbs"]
    assert (fb.thumbs_up, fb.correction, completion.completion_id) == (False, "A better answer.", ids[0])
    assert fb.request_id == thumbs.headers["x-request-id"] and fb.request_id.startswith("req_")  # the gateway's
    assert fb.model_version == completion.model_version == "1"
