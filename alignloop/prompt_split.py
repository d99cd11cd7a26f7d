"""The one held-out split of prompts that PPO, its gate (`alignloop ppo evaluate`) and the simulated users of
`alignloop simulate` / `alignloop demo` agree on: a prompt is held out by a hash of its messages, so the same
prompt is always on the same side, in every process."""

from __future__ import annotations

import hashlib
import json


def content_hash(value) -> str:
    """sha256 of a canonical JSON form: the same prompts (or prompt set, or demonstrations) give the same hash."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def is_held_out(messages: list[dict], fraction: float) -> bool:
    """Whether `messages` falls in the held-out `fraction`."""
    return int(content_hash(messages)[:16], 16) / 2**64 < fraction
