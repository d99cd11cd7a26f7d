"""PPO's prompts: the conversations users actually sent (distinct prompts from the feedback store's completion
records), optionally mixed with a prompt file.

A prompt file is JSON lines, one prompt a line: {"messages": [{"role": ..., "content": ...}, ...]} or
{"prompt": "text"} (a single user turn). `.gz` files are read too.

Prompts are split into train and held-out by a hash of their content (the same prompt is always on the same
side), so `alignloop ppo evaluate` judges on prompts the run never optimised.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from alignloop.prompt_split import content_hash, is_held_out

Messages = list[dict]


def check_messages(messages, where: str) -> Messages:
    """A prompt's messages, checked (non-empty, string role and content, not ending with an answer)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{j}] needs string role and content")
    if messages[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the last message is the assistant's; a prompt ends before the answer")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def json_lines(path: Path) -> Iterator[tuple[str, dict]]:
    """("PATH:LINE", object) for each non-blank line of a JSON-lines file, plain or .gz."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{n}", json.loads(line)


def read_prompt_file(path: Path) -> list[Messages]:
    out = []
    for where, row in json_lines(path):
        if "messages" in row:
            out.append(check_messages(row["messages"], where))
        elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
            out.append([{"role": "user", "content": row["prompt"]}])
        else:
            raise ValueError(f"{where}: expected 'messages' or a non-empty 'prompt'")
    return out


def read_store_prompts(store_url: str, limit: int | None = None) -> list[Messages]:
    """Distinct prompts of the completions users were served, newest first."""
    from sqlalchemy import func, select

    from alignloop.store import connect
    from alignloop.store.schema import Completion

    engine = connect(store_url)
    try:
        newest = (select(Completion.prompt_hash, func.max(Completion.created_at).label("at"))
                  .group_by(Completion.prompt_hash).subquery())
        query = (select(Completion.prompt_hash, Completion.messages)
                 .join(newest, Completion.prompt_hash == newest.c.prompt_hash)
                 .order_by(newest.c.at.desc()))
        seen: dict[str, Messages] = {}
        with engine.connect() as conn:
            for prompt_hash, messages in conn.execute(query):
                if prompt_hash not in seen:
                    seen[prompt_hash] = messages
                    if limit is not None and len(seen) >= limit:
                        break
        return list(seen.values())
    finally:
        engine.dispose()


def build_prompt_set(store_prompts: Sequence[Messages], file_prompts: Sequence[Messages],
                     eval_fraction: float) -> tuple[list[Messages], list[Messages]]:
    """(train, held-out) distinct prompts from both sources."""
    distinct: dict[str, Messages] = {}
    for messages in [*store_prompts, *file_prompts]:
        distinct.setdefault(content_hash(messages), messages)
    train = [m for m in distinct.values() if not is_held_out(m, eval_fraction)]
    held = [m for m in distinct.values() if is_held_out(m, eval_fraction)]
    return train, held
