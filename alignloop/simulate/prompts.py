"""What the simulated users ask: built-in prompts (templates × topics), or a prompt file.

A prompt file is JSON lines, one prompt a line: {"prompt": "text"} (a single user turn) or
{"messages": [{"role": ..., "content": ...}, ...]} ending before the answer; the format of
`alignloop ppo train --prompt-file`.

`split` uses the held-out rule PPO uses (`alignloop.prompt_split`), so that for the same fraction the prompts
held out here are the ones `alignloop ppo evaluate` evaluates on: a demo can train on the rest and measure on
prompts no feedback was ever given for.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from alignloop.prompt_split import is_held_out

Messages = list[dict[str, str]]

TEMPLATES = (
    "Explain {topic} in one sentence.",
    "Give me a tip about {topic}.",
    "What is {topic}?",
    "Why does {topic} matter?",
    "Describe {topic} to a child.",
    "What is a common misconception about {topic}?",
    "Summarize what you know about {topic} in two sentences.",
    "What is the most important fact about {topic}?",
    "How would you teach {topic} to a beginner?",
    "Tell me something surprising about {topic}.",
    "What are the pros and cons of {topic}?",
    "Give a simple example of {topic}.",
)

TOPICS = (
    "photosynthesis", "black holes", "compound interest", "the water cycle", "machine learning", "volcanoes",
    "the French Revolution", "vaccines", "climate change", "the stock market", "gravity", "DNA",
    "the internet", "recycling", "sleep", "coffee", "chess", "the Roman Empire", "electric cars",
    "bread baking", "honeybees", "the moon", "inflation", "meditation", "earthquakes", "solar panels",
    "the human heart", "jazz", "rainbows", "password security", "composting", "the Pythagorean theorem",
    "octopuses", "public speaking", "time zones", "antibiotics", "glaciers", "marathon training", "origami",
    "the printing press",
)


def user(text: str) -> Messages:
    """A one-turn conversation."""
    return [{"role": "user", "content": text}]


def generate(seed: int = 0) -> list[Messages]:
    """Every distinct built-in prompt (len(TEMPLATES) × len(TOPICS) = 480), in an order fixed by `seed`."""
    texts = [t.format(topic=topic) for t in TEMPLATES for topic in TOPICS]
    random.Random(seed).shuffle(texts)
    return [user(t) for t in texts]


def prompt_text(messages: Messages) -> str:
    """What the labeler judges an answer against: the last user message."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def read_prompt_file(path: Path) -> list[Messages]:
    """The prompts of a JSON-lines file; ValueError naming PATH:LINE for a line that is not one."""
    out: list[Messages] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{where}: not JSON ({exc})") from None
            out.append(_prompt(row, where))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def _prompt(row: object, where: str) -> Messages:
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return user(row["prompt"])
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected {{\"prompt\": str}} or {{\"messages\": [...]}}")
    bad = next((j for j, m in enumerate(messages) if not _is_message(m)), None)
    if bad is not None:
        raise ValueError(f"{where}: messages[{bad}] needs string role and content")
    if messages[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the last message is the assistant's; a prompt ends before the answer")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _is_message(m: object) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def split(prompts: Sequence[Messages], fraction: float) -> tuple[list[Messages], list[Messages]]:
    """(train, held_out): `prompts` divided by `is_held_out`, each in its original order."""
    train: list[Messages] = []
    held_out: list[Messages] = []
    for p in prompts:
        (held_out if is_held_out(p, fraction) else train).append(p)
    return train, held_out
