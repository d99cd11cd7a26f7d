"""PPO's and SFT's data: prompts users sent (from the store), demonstrations from a snapshot, files."""

from __future__ import annotations

import json

import pytest

from pipelines import demonstrations
from pipelines.ppo import prompts
from tests.unit.test_feedback_export import P1, P2, P3, P4, P5, _export, db  # noqa: F401 (fixture)


def test_store_prompts_are_the_distinct_prompts_users_sent(db):  # noqa: F811
    got = prompts.read_store_prompts(db.url)
    assert sorted(map(json.dumps, got)) == sorted(map(json.dumps, [P1, P2, P3, P4, P5]))
    assert len(prompts.read_store_prompts(db.url, limit=2)) == 2


def test_prompt_split_is_stable_and_disjoint():
    many = [[{"role": "user", "content": f"q{i}"}] for i in range(200)]
    train, held = prompts.build_prompt_set(many[:150], many[100:], eval_fraction=0.2)
    assert len(train) + len(held) == 200  # the overlap counted once
    assert not {json.dumps(m) for m in train} & {json.dumps(m) for m in held}
    assert 20 <= len(held) <= 60
    # The side a prompt lands on depends on the prompt alone, not on the order it came in.
    forward = prompts.build_prompt_set(many, [], 0.2)[1]
    backward = prompts.build_prompt_set(list(reversed(many)), [], 0.2)[1]
    assert sorted(map(json.dumps, forward)) == sorted(map(json.dumps, backward))


def test_demonstrations_from_a_snapshot(db, tmp_path):  # noqa: F811
    _export(db, tmp_path, "snap")
    got = demonstrations.from_snapshot(tmp_path / "snap")
    assert P3 + [{"role": "assistant", "content": "the answer I wanted"}] in got  # a correction
    assert P2 + [{"role": "assistant", "content": "answer d1"}] in got  # rated 6 of 7
    assert len(got) == 2
    assert len(demonstrations.from_snapshot(tmp_path / "snap", min_rating=7)) == 1
    with_thumbs = demonstrations.from_snapshot(tmp_path / "snap", thumbs_up=True)
    assert P3 + [{"role": "assistant", "content": "answer e1"}] in with_thumbs and len(with_thumbs) == 4


def test_prompt_and_demonstration_files_are_checked(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hello"}) + "\n\n" + json.dumps({"messages": P1}) + "\n")
    assert prompts.read_prompt_file(path) == [[{"role": "user", "content": "hello"}], P1]
    path.write_text(json.dumps({"messages": P1 + [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="p.jsonl:1"):
        prompts.read_prompt_file(path)
    demo = tmp_path / "d.jsonl"
    demo.write_text(json.dumps({"prompt": "hi", "response": "hello!"}) + "\n")
    assert demonstrations.from_file(demo) == [[{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello!"}]]
    demo.write_text(json.dumps({"messages": P1}) + "\n")
    with pytest.raises(ValueError, match="ends with a non-empty assistant message"):
        demonstrations.from_file(demo)
