"""Demonstrations: conversations ending with the answer a policy should have given. InstructGPT's step 1 (SFT)
learns from them, and PPO-ptx mixes them into every PPO step.

Sources:
  * a feedback snapshot (`alignloop feedback export`): users' corrections (demonstrations.parquet), and
    answers users rated at least `min_rating` of 7 (pointwise.parquet); thumbs-up answers with `thumbs_up`
  * a file: JSON lines of {"messages": [..., {"role": "assistant", ...}]} or {"prompt": ..., "response": ...}
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.ppo.prompts import check_messages, json_lines

Conversation = list[dict]


def from_snapshot(folder: Path, *, min_rating: int = 6, thumbs_up: bool = False) -> list[Conversation]:
    import pandas as pd

    folder = Path(folder)
    out: list[Conversation] = []
    demos = folder / "demonstrations.parquet"
    if demos.exists():
        for row in pd.read_parquet(demos).itertuples(index=False):
            out.append(json.loads(row.messages) + [{"role": "assistant", "content": row.demonstration}])
    points = folder / "pointwise.parquet"
    if points.exists():
        for row in pd.read_parquet(points).itertuples(index=False):
            good = (row.kind == "rating" and row.rating is not None and row.rating >= min_rating) or \
                   (thumbs_up and row.kind == "thumbs" and bool(row.thumbs_up))
            if good and row.response.strip():
                out.append(json.loads(row.messages) + [{"role": "assistant", "content": row.response}])
    return dedupe(out)


def from_file(path: Path) -> list[Conversation]:
    """Conversations ending with the assistant's answer to imitate (PPO-ptx and SFT data), JSON lines of
    {"messages": [...]} or {"prompt": "...", "response": "..."}."""
    out = []
    for where, row in json_lines(path):
        if "messages" in row:
            messages = row["messages"]
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            messages = [{"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row["response"]}]
        else:
            raise ValueError(f"{where}: expected 'messages' or 'prompt' and 'response'")
        if not messages or messages[-1].get("role") != "assistant" or not messages[-1].get("content"):
            raise ValueError(f"{where}: a demonstration ends with a non-empty assistant message")
        check_messages(messages[:-1], where)
        out.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return dedupe(out)


def dedupe(conversations: list[Conversation]) -> list[Conversation]:
    seen: dict[str, Conversation] = {}
    for c in conversations:
        seen.setdefault(json.dumps(c, sort_keys=True, ensure_ascii=False), c)
    return list(seen.values())

