"""X-Request-Id through the gateway's app: taken or made, echoed on every response, kept in the records."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from alignloop.config import Settings
from alignloop.credentials import Credentials
from alignloop.v1 import policy_pb2 as pb
from services.gateway.app import create_app
from services.gateway.auth import KeyRing
from services.gateway.chat import ChatService
from services.gateway.request_id import MAX_CHARS
from services.gateway.routing import PolicyRouter
from tests.unit.test_gateway import MODEL, FakeLog, FakeStreamCall, FakeStub

APP = {"Authorization": "Bearer a-key"}
CHAT = {"model": "alignloop-policy", "messages": [{"role": "user", "content": "hi"}]}
MADE = re.compile(r"req_[0-9a-f]{32}")


class Gateway:
    """The real app with a fake policy stub behind its chat service."""

    def __init__(self, tmp_path) -> None:
        app = create_app(Settings(home=tmp_path))
        app.state.keys = KeyRing(Credentials(app_key="a-key", operator_key="o-key"))
        self.log = FakeLog()
        answer = pb.Completion(index=0, text="Hi", token_ids=[5], finish_reason="stop")
        self.stub = FakeStub(
            unary=pb.GenerateResponse(completions=[answer], prompt_tokens=3, model=MODEL),
            stream=FakeStreamCall([pb.GenerateStreamResponse(prompt_tokens=3, model=MODEL),
                                   pb.GenerateStreamResponse(deltas=[answer])]),
        )
        app.state.chat = ChatService(PolicyRouter(self.stub), self.log, 10)
        self.client = TestClient(app)


@pytest.fixture
def gateway(tmp_path) -> Gateway:
    return Gateway(tmp_path)


def test_the_callers_id_comes_back_and_is_in_the_record(gateway):
    headers = {**APP, "X-Request-Id": "app-42:turn/7"}
    got = gateway.client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert got.status_code == 200
    assert got.headers["x-request-id"] == "app-42:turn/7"
    [record] = gateway.log.records
    assert record.request_id == "app-42:turn/7"
    assert record.response_id == got.json()["id"]


def test_without_one_the_gateway_makes_a_new_id_per_request(gateway):
    first = gateway.client.post("/v1/chat/completions", json=CHAT, headers=APP)
    second = gateway.client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=APP)
    assert second.text.endswith("data: [DONE]\n\n")
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert all(MADE.fullmatch(i) for i in ids) and ids[0] != ids[1]
    assert [r.request_id for r in gateway.log.records] == ids
    assert gateway.log.records[1].stream is True


@pytest.mark.parametrize("bad", ["two words", "x" * (MAX_CHARS + 1), "tab\there", "caf\u00e9"])
def test_a_malformed_id_is_a_400_naming_the_header_and_nothing_is_served(gateway, bad):
    got = gateway.client.post("/v1/chat/completions", json=CHAT,
                              headers={**APP, "X-Request-Id": bad.encode("utf-8")})
    assert got.status_code == 400
    error = got.json()["error"]
    assert error["param"] == "X-Request-Id" and error["code"] == "invalid_request_id"
    assert MADE.fullmatch(got.headers["x-request-id"])  # a fresh id, not the refused value
    assert gateway.stub.sent == [] and gateway.log.records == []


def test_the_longest_allowed_id_is_taken(gateway):
    rid = "x" * MAX_CHARS
    got = gateway.client.post("/v1/chat/completions", json=CHAT, headers={**APP, "X-Request-Id": rid})
    assert got.status_code == 200 and got.headers["x-request-id"] == rid


@pytest.mark.parametrize(("path", "headers", "status"), [
    ("/v1/models", {}, 401),  # refused by auth
    ("/healthz", {}, 200),  # no auth needed
    ("/no/such/route", APP, 404),
])
def test_every_response_carries_the_id(gateway, path, headers, status):
    got = gateway.client.get(path, headers={**headers, "X-Request-Id": "probe-1"})
    assert got.status_code == status and got.headers["x-request-id"] == "probe-1"


def test_an_unexpected_error_is_a_500_in_openai_format_naming_the_request_id(tmp_path, caplog):
    app = create_app(Settings(home=tmp_path))
    app.state.keys = KeyRing(Credentials(app_key="a-key", operator_key="o-key"))

    class Broken:
        async def complete(self, *args):
            raise RuntimeError("a bug")

    app.state.chat = Broken()
    client = TestClient(app, raise_server_exceptions=False)
    got = client.post("/v1/chat/completions", json=CHAT, headers={**APP, "X-Request-Id": "bug-1"})
    assert got.status_code == 500 and got.headers["x-request-id"] == "bug-1"
    error = got.json()["error"]
    assert error["type"] == "api_error" and "bug-1" in error["message"] and "a bug" not in error["message"]
    assert any("bug-1" in r.getMessage() and r.exc_info for r in caplog.records)
    assert app.state.admission.total == 0  # its place is given back all the same
