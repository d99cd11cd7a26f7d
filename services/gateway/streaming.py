"""The SSE events of one streamed chat completion, rendered cheaply for the one event that is sent per token.

A content delta is nearly every event of a stream, and within a stream its JSON differs only in the text: the
id, creation time, model, choice index and completion id never change. So each choice's delta is rendered once
through the protocol models, with a marker for the text, and split around the marker; a token then costs one
`json.dumps` of its text instead of building, validating and serialising three pydantic models. Every other
event (role, finish, logprobs, usage, errors) goes through the models. Both give the same JSON (a unit test
holds them to it).
"""

from __future__ import annotations

import json

from services.gateway.protocol import ChatCompletionChunk, ChunkChoice, DeltaMessage, Usage

# A text no token decodes to, escaped the same way by pydantic and by json.dumps.
_MARKER = "\x00"
_MARKER_JSON = json.dumps(_MARKER)


def sse(data: str) -> bytes:
    """One server-sent event carrying `data` (a JSON document or [DONE]: never a line break)."""
    return b"data: " + data.encode() + b"\n\n"


class ChunkRenderer:
    """Renders the `chat.completion.chunk` events of one stream as SSE bytes."""

    def __init__(self, response_id: str, created: int, model: str, system_fingerprint: str,
                 completion_ids: list[str]) -> None:
        self._header = {"id": response_id, "created": created, "model": model,
                        "system_fingerprint": system_fingerprint}
        self._completion_ids = completion_ids
        self._content: list[tuple[bytes, bytes]] = []
        for index, completion_id in enumerate(completion_ids):
            template = self.chunk([ChunkChoice(index=index, delta=DeltaMessage(content=_MARKER),
                                               completion_id=completion_id)])
            before, marker, after = template.partition(_MARKER_JSON.encode())
            assert marker and _MARKER_JSON.encode() not in after, "the marker must appear exactly once"
            self._content.append((before, after))

    def chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        """Any chunk, through the protocol models."""
        return sse(ChatCompletionChunk(choices=choices, usage=usage, **self._header).model_dump_json(exclude_none=True))

    def content(self, index: int, text: str) -> bytes:
        """A content delta of choice `index`, with no finish reason and no logprobs: the per-token event."""
        before, after = self._content[index]
        # ensure_ascii=False: pydantic writes non-ASCII characters as they are, not as \\u escapes.
        return before + json.dumps(text, ensure_ascii=False).encode() + after

    def role(self, index: int) -> bytes:
        """The opening chunk of choice `index`."""
        return self.chunk([ChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""),
                                       completion_id=self._completion_ids[index])])
