"""Scheduling priorities per tenant: the credentials file and `alignloop keys priority`, and what the gateway
sends the policy service (a recording stub stands in for it; tests/integration/test_priorities.py has vLLM
order real requests by them)."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from alignloop import credentials, keys_cli
from alignloop.cli import build_parser
from alignloop.config import Settings
from alignloop.credentials import DEFAULT_APP, OPERATOR, Credentials, CredentialsError
from alignloop.v1 import policy_pb2 as pb
from services.gateway.app import create_app
from services.gateway.auth import KeyRing
from services.gateway.chat import ChatService
from services.gateway.routing import PolicyRouter
from tests.unit.test_gateway import MODEL, FakeLog, FakeStreamCall, FakeStub
from tests.unit.test_keys import run_cli

CHAT = {"model": "alignloop-policy", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = pb.Completion(index=0, text="Hi", token_ids=[5], finish_reason="stop")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "credentials.json"
    credentials.load_or_create(p)
    return p


def test_a_tenants_priority_follows_it_through_rotations_and_goes_with_it(path: Path):
    credentials.add_app(path, "batch")
    credentials.set_priority(path, "batch", 10)
    new = credentials.rotate(path, "batch", grace_s=0)
    ring = KeyRing.from_file(path)
    assert ring.authenticate(f"Bearer {new}").priority == 10
    assert ring.authenticate(f"Bearer {credentials.load(path).app_key}").priority == 0
    credentials.revoke(path, "batch")
    assert credentials.load(path).priorities == {}
    with pytest.raises(CredentialsError, match="no key named 'batch'"):
        credentials.set_priority(path, "batch", 1)
    with pytest.raises(CredentialsError, match="integer from"):
        credentials.set_priority(path, DEFAULT_APP, 2**31)


def test_the_default_priority_leaves_no_entry(path: Path):
    credentials.set_priority(path, DEFAULT_APP, -5)
    assert json.loads(path.read_text())["priorities"] == {credentials.load(path).tenant(DEFAULT_APP): -5}
    credentials.set_priority(path, DEFAULT_APP, None)
    assert "priorities" not in json.loads(path.read_text())
    credentials.set_priority(path, DEFAULT_APP, 0)
    assert "priorities" not in json.loads(path.read_text())


def test_the_priority_command(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path))
    run_cli(keys_cli.cmd_keys_add_app, capsys, name="chat-ui")
    # Through the real parser: a negative priority is a value, not a flag.
    args = build_parser().parse_args(["keys", "priority", "chat-ui", "-5"])
    assert args.func(args) == 0
    assert "priority -5" in capsys.readouterr().err
    code, out, _ = run_cli(keys_cli.cmd_keys_list, capsys, json=True)
    assert {r["name"]: r["priority"] for r in json.loads(out)} == {"default": 0, "operator": 0, "chat-ui": -5}
    args = build_parser().parse_args(["keys", "priority", "chat-ui", "default"])
    assert args.func(args) == 0
    assert credentials.load(tmp_path / "credentials.json").priorities == {}
    code, _, err = run_cli(keys_cli.cmd_keys_priority, capsys, name="nobody", priority=1)
    assert code == 2 and "no key named 'nobody'" in err
    with pytest.raises(argparse.ArgumentTypeError, match="not a priority"):
        keys_cli.priority("high")


class RecordingPolicy(FakeStub):
    """Answers every call, keeping what it was sent."""

    def __init__(self) -> None:
        super().__init__(unary=pb.GenerateResponse(completions=[ANSWER], prompt_tokens=3, model=MODEL))

    def GenerateStream(self, req, timeout=None, metadata=None):
        self.sent.append(req)
        return FakeStreamCall([pb.GenerateStreamResponse(prompt_tokens=3, model=MODEL),
                               pb.GenerateStreamResponse(deltas=[ANSWER])])


def post_chats(priorities: dict[str, int], bodies: list[tuple[str, dict]]):
    """Posts each (key, body) to a gateway whose keys 'a-key' (default) and 'o-key' (operator) have these
    priorities; the responses and the requests the policy got."""
    async def scenario():
        app = create_app(Settings(_env_file=None))
        creds = Credentials(app_key="a-key", operator_key="o-key")
        tenants = {"a-key": creds.tenant(DEFAULT_APP), "o-key": creds.tenant(OPERATOR)}
        app.state.keys = KeyRing(replace(creds, priorities={tenants[k]: p for k, p in priorities.items()}))
        policy = RecordingPolicy()
        app.state.chat = ChatService(PolicyRouter(policy), FakeLog(), 10)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            responses = [await client.post("/v1/chat/completions", json=body,
                                           headers={"Authorization": f"Bearer {key}"}) for key, body in bodies]
        return responses, policy.sent

    return asyncio.run(scenario())


@pytest.mark.parametrize("stream", [False, True])
def test_the_policy_gets_the_tenants_priority_or_a_later_one_the_request_asks_for(stream):
    responses, sent = post_chats({"a-key": 5}, [
        ("a-key", {**CHAT, "stream": stream}),
        ("a-key", {**CHAT, "stream": stream, "priority": 7}),
        ("a-key", {**CHAT, "stream": stream, "priority": 5}),
        ("o-key", {**CHAT, "stream": stream}),
        ("o-key", {**CHAT, "stream": stream, "priority": -3}),  # below 0 is ahead of its own: refused
    ])
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 400]
    assert [s.priority for s in sent] == [5, 7, 5, 0]
    error = responses[-1].json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "priority")
    assert "at least 0" in error["message"]


def test_a_request_may_not_go_ahead_of_its_tenant():
    responses, sent = post_chats({"a-key": 5}, [("a-key", {**CHAT, "priority": 4})])
    assert responses[0].status_code == 400 and responses[0].json()["error"]["param"] == "priority"
    assert sent == []  # refused before the policy was asked


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1, "soon", 1.5])
def test_a_priority_outside_int32_or_not_an_integer_is_refused_naming_the_field(value):
    responses, sent = post_chats({}, [("a-key", {**CHAT, "priority": value})])
    assert responses[0].status_code == 400, responses[0].text
    assert responses[0].json()["error"]["param"] == "priority" and sent == []
