"""vLLM's stream interval through the whole path: a policy service whose engine streams in pieces of
STREAM_INTERVAL tokens, behind a gateway replica of the stack. The first token goes out on its own, the
rest in pieces of that size, and the streamed answer must be the one the same engine gives unstreamed.

vLLM joins a stream's pieces that its reader has not yet taken (a test machine's slow moment), so the tests
check where pieces end, not how many there are: only after the first token, after each further interval, and
at the answer's end."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import grpc
import pytest
from openai import OpenAI

from alignloop.v1 import policy_pb2 as pb
from alignloop.v1 import policy_pb2_grpc as pb_grpc
from tests.conftest import Stack
from tests.integration.processes import gateway_replica, policy_replica

pytestmark = pytest.mark.integration

MODEL = "alignloop-policy"
STREAM_INTERVAL = 4
MAX_TOKENS = 11  # the first token, two full pieces, and a short last one
PIECE_ENDS = {1, 5, 9, 11}  # tokens sent when a piece may end: 1 + k * STREAM_INTERVAL, or all of them


def piece_ends(sizes: list[int]) -> list[int]:
    """The running token count at the end of each piece."""
    return list(itertools.accumulate(sizes))


@pytest.fixture(scope="module")
def interval_stack(stack: Stack, tmp_path_factory) -> Iterator[tuple[OpenAI, int]]:
    """An OpenAI client on a gateway in front of a policy service with the stream interval; and that policy
    service's gRPC port."""
    logs = tmp_path_factory.mktemp("stream-interval")
    with policy_replica(stack, logs, ALIGNLOOP_STREAM_INTERVAL=str(STREAM_INTERVAL)) as (port, _):
        with gateway_replica(stack, logs, ALIGNLOOP_POLICY_PORT=str(port)) as url:
            yield OpenAI(base_url=f"{url}/v1", api_key=stack.credentials["app_key"], max_retries=0), port


def test_the_policy_streams_the_first_token_alone_then_pieces_of_the_interval(interval_stack):
    _, port = interval_stack
    request = pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Count.")]),
        sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0, logprobs=True),
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        responses = list(pb_grpc.PolicyServiceStub(channel).GenerateStream(request, timeout=120))
    pieces = [d for r in responses for d in r.deltas if d.token_ids]
    ends = piece_ends([len(d.token_ids) for d in pieces])
    assert set(ends) <= PIECE_ENDS and ends[-1] == MAX_TOKENS, ends
    assert all(len(d.logprobs) == len(d.token_ids) for d in pieces)
    assert pieces[-1].finish_reason == "length"


def test_the_gateway_streams_the_pieces_and_the_same_answer_as_unstreamed(interval_stack):
    client, _ = interval_stack
    common = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], temperature=0,
                  max_tokens=MAX_TOKENS, logprobs=True, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**common)
    chunks = list(client.chat.completions.create(**common, stream=True,
                                                 stream_options={"include_usage": True}))
    tokens_per_chunk = [len(c.choices[0].logprobs.content) for c in chunks
                        if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content]
    ends = piece_ends(tokens_per_chunk)
    assert set(ends) <= PIECE_ENDS and ends[-1] == MAX_TOKENS, ends
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS
