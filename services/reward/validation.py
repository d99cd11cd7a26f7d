"""What a Score request must look like; the first problem found is reported with the field it is in."""

from __future__ import annotations

from dataclasses import dataclass

from alignloop.v1 import reward_pb2 as pb

# The roles alignloop.reward_model.render knows how to place in the transcript.
ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class Problem:
    param: str  # the offending field, as the gateway will name it: "items[3].response"
    message: str


def check_request(request: pb.ScoreRequest, max_items: int) -> Problem | None:
    """None when every item can be scored, else the first problem."""
    n = len(request.items)
    if n == 0:
        return Problem("items", "at least one item is required")
    if n > max_items:
        return Problem("items", f"at most {max_items} items per call (got {n}); split the request")
    for i, item in enumerate(request.items):
        if not item.messages:
            return Problem(f"items[{i}].messages",
                           "an item needs the conversation it answers (at least one message)")
        for j, m in enumerate(item.messages):
            if m.role not in ROLES:
                return Problem(f"items[{i}].messages[{j}].role",
                               f"unknown role {m.role!r}; expected one of {', '.join(ROLES)}")
        if not item.response:
            return Problem(f"items[{i}].response", "the response to score is empty")
    return None
