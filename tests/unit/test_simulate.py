"""`alignloop simulate`: the labeler's rules and noise, the prompt sets, and the traffic driver against a fake
gateway (httpx.MockTransport) whose feedback bodies are checked with the gateway's own models."""

from __future__ import annotations

import functools
import itertools
import json
import re
import threading

import httpx
import pytest

from alignloop.cli import build_parser
from alignloop.simulate import cli as simulate_cli
from alignloop.simulate import labeler as rules
from alignloop.simulate import prompts as prompt_sets
from alignloop.simulate.labeler import WEIGHTS, Answer, Labeler, components, score
from alignloop.simulate.traffic import KINDS, RetryPolicy, parse_mix, simulate
from services.gateway.feedback_protocol import FEEDBACK_ITEM

PROMPT = "Explain black holes in one sentence."
GOOD = "A black hole is a region of space where gravity is so strong that not even light escapes."
NO_RETRY_WAIT = RetryPolicy(attempts=3, initial_s=0.0, max_s=0.0)


# ---- the labeler's rules ---------------------------------------------------------------------------------

def test_on_topic_beats_off_topic():
    off = "Bananas are a good source of potassium and taste sweet."
    assert components(PROMPT, GOOD).on_topic == 1.0
    assert components(PROMPT, off).on_topic == 0.0
    assert score(PROMPT, GOOD) - score(PROMPT, off) == pytest.approx(WEIGHTS.on_topic)
    # instruction and stop words do not count: repeating the request is not being on topic
    assert components(PROMPT, "In one sentence, I explain.").on_topic == 0.0


def test_a_cut_off_answer_loses_to_a_finished_one():
    cut = "A black hole is a region of space where gravity is so strong that"
    assert score(PROMPT, GOOD) > score(PROMPT, cut)
    # ends with a full stop but the token limit stopped it: still unfinished
    assert score(PROMPT, Answer(GOOD, "length")) == score(PROMPT, cut)
    assert score(PROMPT, Answer(GOOD, "stop")) - score(PROMPT, cut) == pytest.approx(WEIGHTS.finished)
    assert rules.is_finished('He said "black holes evaporate."') and rules.is_finished("Really (yes!)")


def test_long_loses_to_concise_and_the_penalty_grows():
    def padded(words: int) -> str:
        filler = " ".join(f"filler{i}" for i in range(words - len(GOOD.split())))
        return f"{GOOD[:-1]} {filler}."

    assert components(PROMPT, padded(40)).extra_words == 0
    assert components(PROMPT, padded(60)).extra_words == 20
    assert score(PROMPT, GOOD) == score(PROMPT, padded(40)) > score(PROMPT, padded(60)) > score(PROMPT, padded(90))
    assert score(PROMPT, padded(40)) - score(PROMPT, padded(60)) == pytest.approx(20 * WEIGHTS.per_extra_word)


def test_repetition_is_penalised():
    looped = "Black holes are dark. Black holes are dark. Black holes are dark. Black holes are dark."
    assert components(PROMPT, GOOD).repetition == 0.0
    assert components(PROMPT, looped).repetition > 0.5
    assert score(PROMPT, looped) < score(PROMPT, GOOD) - 1.0


def test_score_is_the_weighted_sum_and_the_docs_state_the_weights():
    parts = components(PROMPT, Answer(GOOD + " " + GOOD, "stop"))
    w = WEIGHTS
    expected = (w.on_topic * parts.on_topic + w.finished * parts.finished - w.per_extra_word * parts.extra_words
                - w.repetition * parts.repetition)
    assert score(PROMPT, Answer(GOOD + " " + GOOD, "stop")) == pytest.approx(expected)
    assert score(PROMPT, GOOD) == w.best == 3.0
    for value in (w.on_topic, w.finished, w.per_extra_word, w.concise_words, w.repetition, w.thumbs_up_at):
        assert f"{value:g}" in rules.__doc__ and f"{value:g}" in rules.describe()
    # a custom weighting is honoured
    assert score(PROMPT, GOOD, rules.Weights(on_topic=0.5)) == 1.5


# ---- the labeler's noise -------------------------------------------------------------------------------

# scores 3.0, 2.5 (20 words too many), 2.0 (cut off), 1.0 (off topic), 0.0 (both), -1.67 (looping)
ANSWERS = [GOOD, "Black holes are " + " ".join(f"w{i}" for i in range(56)) + " dark.", "A black hole is where", "Bananas are yellow.",
           "Bananas are", "la la la la la la la la"]


def test_noise_free_labels_follow_the_score():
    labeler = Labeler(noise=0.0, seed=1)
    scores = [score(PROMPT, a) for a in ANSWERS]
    assert len(set(scores)) == len(scores)
    for i, j in itertools.combinations(range(len(ANSWERS)), 2):
        for _ in range(5):
            assert labeler.prefer(PROMPT, ANSWERS[i], ANSWERS[j]) == (0 if scores[i] > scores[j] else 1)
    assert labeler.rank(PROMPT, ANSWERS) == sorted(range(len(ANSWERS)), key=lambda k: -scores[k])
    for a, s in zip(ANSWERS, scores):
        assert labeler.thumbs(PROMPT, a) == (s >= WEIGHTS.thumbs_up_at)
        assert labeler.rating(PROMPT, a) == rules.rating_of(s)
    assert labeler.rating(PROMPT, GOOD) == 7 and labeler.rating(PROMPT, "la la la la la la la la") == 1


def test_noise_flips_about_a_quarter_of_comparisons():
    labeler = Labeler(noise=0.25, seed=7)
    judge = Labeler(noise=0.0)
    flips = 0
    for k in range(2000):
        a, b = ANSWERS[k % 2], ANSWERS[3]  # distinct scores: a flip is visible
        truth = 0 if judge.judge(PROMPT, a, b) == 1.0 else 1
        flips += labeler.prefer(PROMPT, a, b) != truth
    assert 0.2 <= flips / 2000 <= 0.3
    up = sum(labeler.thumbs(PROMPT, GOOD) for _ in range(2000))  # truly up: about 75% stay up
    assert 0.7 <= up / 2000 <= 0.8


def test_ratings_stay_within_1_to_7():
    labeler = Labeler(noise=1.0, seed=3)
    values = {labeler.rating(PROMPT, a) for a in ANSWERS * 200}
    assert values <= set(range(1, 8)) and {1, 7} <= values  # clipped at both ends, never beyond


def test_ranking_of_two_is_one_comparison_and_ties_are_coin_flips():
    a, b = Labeler(noise=0.25, seed=5), Labeler(noise=0.25, seed=5)
    for _ in range(100):
        expected = [0, 1] if b.prefer(PROMPT, GOOD, ANSWERS[3]) == 0 else [1, 0]
        assert a.rank(PROMPT, [GOOD, ANSWERS[3]]) == expected
    tie = Labeler(noise=0.0, seed=2)
    firsts = sum(tie.prefer(PROMPT, GOOD, GOOD) == 0 for _ in range(1000))
    assert 400 < firsts < 600


def test_judge_is_noise_free():
    labeler = Labeler(noise=1.0)
    assert labeler.judge(PROMPT, GOOD, ANSWERS[3]) == 1.0
    assert labeler.judge(PROMPT, ANSWERS[3], GOOD) == 0.0
    assert labeler.judge(PROMPT, GOOD, GOOD) == 0.5


def test_labels_are_reproducible_by_seed_and_forks_are_independent():
    def labels(lab: Labeler) -> list:
        return [(lab.prefer(PROMPT, GOOD, a), lab.rating(PROMPT, a), lab.thumbs(PROMPT, a)) for a in ANSWERS * 20]

    assert labels(Labeler(seed=4)) == labels(Labeler(seed=4))
    assert labels(Labeler(seed=4)) != labels(Labeler(seed=5))
    assert labels(Labeler(seed=4).fork(1)) == labels(Labeler(seed=4).fork(1)) != labels(Labeler(seed=4).fork(2))
    with pytest.raises(ValueError):
        Labeler(noise=1.5)


# ---- prompts -------------------------------------------------------------------------------------------

def test_built_in_prompts_are_distinct_and_ordered_by_seed():
    first = prompt_sets.generate(0)
    assert len(first) == len(prompt_sets.TEMPLATES) * len(prompt_sets.TOPICS) >= 300
    assert len({p[0]["content"] for p in first}) == len(first)
    assert first == prompt_sets.generate(0) != prompt_sets.generate(1)
    # every built-in prompt has something to be on topic about
    assert all(rules.content_words(prompt_sets.prompt_text(p)) for p in first)


def test_prompt_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Hi"}\n\n{"messages": [{"role": "system", "content": "Be brief."}, '
                    '{"role": "user", "content": "Why?"}]}\n')
    got = prompt_sets.read_prompt_file(path)
    assert got == [[{"role": "user", "content": "Hi"}],
                   [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]]
    assert prompt_sets.prompt_text(got[1]) == "Why?"
    for bad, message in [('{"text": "x"}', "p.jsonl:1: expected"), ("nope", "not JSON"),
                         ('{"messages": [{"role": "user"}]}', "messages[0]"),
                         ('{"messages": [{"role": "assistant", "content": "a"}]}', "assistant's")]:
        path.write_text(bad + "\n")
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            prompt_sets.read_prompt_file(path)


def test_held_out_split_is_by_hash_as_in_ppo():
    from pipelines.ppo.prompts import is_held_out as ppo_is_held_out

    everything = prompt_sets.generate(0)
    train, held_out = prompt_sets.split(everything, 0.2)
    assert len(train) + len(held_out) == len(everything) and 0.1 < len(held_out) / len(everything) < 0.3
    assert prompt_sets.split(prompt_sets.generate(9), 0.2)[1] != held_out  # another order ...
    assert sorted(map(str, prompt_sets.split(prompt_sets.generate(9), 0.2)[1])) == sorted(map(str, held_out))
    assert all(ppo_is_held_out(p, 0.2) for p in held_out) and not any(ppo_is_held_out(p, 0.2) for p in train)
    assert prompt_sets.split(everything, 0.0) == (everything, [])


# ---- the mix ------------------------------------------------------------------------------------------

def test_parse_mix():
    assert parse_mix("thumbs=0.25,rating=0.25,comparison=0.25,ranking=0.25") == dict.fromkeys(KINDS, 0.25)
    assert parse_mix(" thumbs = 3 , ranking=1") == {"thumbs": 0.75, "rating": 0.0, "comparison": 0.0,
                                                    "ranking": 0.25}
    for bad in ("", "thumbs", "likes=1", "thumbs=1,thumbs=2", "thumbs=x", "thumbs=-1", "thumbs=0",
                "thumbs=nan", "thumbs=inf", "=1"):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_a_bad_mix_is_an_argparse_error_naming_it(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["simulate", "--mix", "likes=1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--mix" in err and "unknown kind 'likes'" in err


# ---- traffic against a fake gateway --------------------------------------------------------------------

class FakeGateway:
    """The gateway's two routes: chat answers of known quality (good, cut off, off topic, looping, by choice
    index), and feedback checked with the gateway's own request models. `fail` maps a path to statuses (or
    exceptions) to answer first."""

    def __init__(self, version: str = "alignloop-policy/v3", fail: dict | None = None) -> None:
        self.version, self.fail = version, {k: list(v) for k, v in (fail or {}).items()}
        self.chats: list[dict] = []
        self.feedback: list[dict] = []
        self.answers: dict[str, Answer] = {}
        self.prompts: dict[str, str] = {}
        self.ids = itertools.count()
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        with self.lock:
            self.calls[path] = self.calls.get(path, 0) + 1
            pending = self.fail.get(path)
            failure = pending.pop(0) if pending else None
        if isinstance(failure, Exception):
            raise failure
        if failure is not None:
            return httpx.Response(failure, json={"error": {"message": f"fake {failure}", "type": "x"}})
        assert request.headers["authorization"] == "Bearer app-key"
        body = json.loads(request.content)
        if path == "/v1/chat/completions":
            return self.chat(body)
        assert path == "/v1/feedback"
        FEEDBACK_ITEM.validate_python(body)  # what the real gateway would accept
        with self.lock:
            self.feedback.append(body)
        return httpx.Response(200, json={"object": "feedback", "feedback_id": "fb_1", "kind": body["kind"],
                                         "client_feedback_id": body.get("feedback_id"), "created": 1,
                                         "completion_ids": body.get("completion_ids", [body.get("completion_id")])})

    def chat(self, body: dict) -> httpx.Response:
        prompt = prompt_sets.prompt_text(body["messages"])
        topic = " ".join(sorted(rules.content_words(prompt)))
        options = [Answer(f"About {topic}: it is well studied.", "stop"), Answer(f"About {topic}: it", "length"),
                   Answer("Bananas are yellow.", "stop"), Answer("la la la la la la la la la", "length")]
        choices = []
        for i in range(body["n"]):
            cid = f"cmpl-{next(self.ids)}"
            answer = options[i % len(options)]
            with self.lock:
                self.answers[cid], self.prompts[cid] = answer, prompt
            choices.append({"index": i, "message": {"role": "assistant", "content": answer.text},
                            "finish_reason": answer.finish_reason, "completion_id": cid})
        with self.lock:
            self.chats.append(body)
        return httpx.Response(200, json={
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "alignloop-policy",
            "system_fingerprint": self.version, "choices": choices[::-1],  # order by index is the client's job
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def run(fake: FakeGateway, **kw):
    kw.setdefault("requests", 20)
    kw.setdefault("concurrency", 3)
    kw.setdefault("retry", NO_RETRY_WAIT)
    return simulate("http://gw", "app-key", transport=httpx.MockTransport(fake), **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_sends_the_right_feedback(kind):
    fake = FakeGateway()
    report = run(fake, n=3, mix=parse_mix(f"{kind}=1"), labeler=Labeler(noise=0.0))
    assert report.feedback == {k: 20 if k == kind else 0 for k in KINDS}
    assert report.requests == report.responses == 20 and report.answers == 60
    assert report.failures == {"chat": 0, "feedback": 0} and report.stopped is None
    assert len(fake.feedback) == 20 and {f["kind"] for f in fake.feedback} == {kind}
    assert len({f["feedback_id"] for f in fake.feedback}) == 20
    for item in fake.feedback:
        if kind in ("thumbs", "rating"):
            answer, prompt = fake.answers[item["completion_id"]], fake.prompts[item["completion_id"]]
            expected = (("up" if score(prompt, answer) >= WEIGHTS.thumbs_up_at else "down") if kind == "thumbs"
                        else rules.rating_of(score(prompt, answer)))
            assert item["value"] == expected
        else:
            ids = item["completion_ids"]
            prompt = fake.prompts[ids[0]]
            scores = [score(prompt, fake.answers[c]) for c in ids]
            if kind == "comparison":
                assert len(ids) == 2 and item["preferred"] == ids[scores.index(max(scores))]
            else:
                assert len(ids) == 3 and scores == sorted(scores, reverse=True)  # best first
    for chat in fake.chats:
        assert chat["n"] == 3 and chat["model"] == "alignloop-policy" and chat["max_tokens"] == 64
        assert chat["temperature"] == 1.0 and isinstance(chat["seed"], int)


def test_the_report_per_version_and_a_mixed_run():
    fake = FakeGateway(version="alignloop-policy/v7")
    report = run(fake, requests=80, n=2, labeler=Labeler(noise=0.0), seed=3)
    assert sum(report.feedback.values()) == 80 and all(report.feedback[k] > 5 for k in KINDS)
    summary = report.to_json()
    v7 = summary["by_version"]["alignloop-policy/v7"]
    # choices 0 and 1: the good answer (3.0) and the cut-off one (2.0)
    assert v7["answers"] == 160 and v7["mean_score"] == pytest.approx(2.5)
    assert v7["mean_components"]["finished"] == pytest.approx(0.5)
    assert v7["thumbs"] == report.feedback["thumbs"] and v7["thumbs_up_rate"] == 1.0
    assert json.loads(json.dumps(summary)) == summary


def test_a_seed_fixes_the_traffic_whatever_the_thread_interleaving():
    def traffic(concurrency: int) -> list:
        fake = FakeGateway()
        run(fake, requests=60, n=3, labeler=Labeler(noise=0.25, seed=8), seed=8, concurrency=concurrency)

        def text(cid: str) -> str:  # completion ids depend on arrival order; the answers do not
            return fake.answers[cid].text

        return sorted(json.dumps([fake.prompts[f.get("completion_id") or f["completion_ids"][0]], f["kind"],
                                  text(f["completion_id"]) if "completion_id" in f else
                                  [text(c) for c in f["completion_ids"]],
                                  f.get("value"), f.get("preferred") and text(f["preferred"])])
                      for f in fake.feedback)

    assert traffic(1) == traffic(4)


def test_pairs_need_two_answers():
    with pytest.raises(ValueError, match="n >= 2"):
        run(FakeGateway(), n=1)
    report = run(FakeGateway(), n=1, mix=parse_mix("thumbs=1,rating=1"))
    assert report.feedback["thumbs"] + report.feedback["rating"] == 20


def test_retries_on_429_503_and_connection_errors_then_gives_up():
    fake = FakeGateway(fail={"/v1/chat/completions": [503, httpx.ConnectError("refused")],
                             "/v1/feedback": [429]})
    report = run(fake, requests=1, mix=parse_mix("ranking=1"))
    assert report.failures == {"chat": 0, "feedback": 0} and report.feedback["ranking"] == 1
    assert fake.calls == {"/v1/chat/completions": 3, "/v1/feedback": 2}

    always = FakeGateway(fail={"/v1/feedback": [503] * 100})
    report = run(always, requests=4, concurrency=1)
    assert report.failures == {"chat": 0, "feedback": 4} and sum(report.feedback.values()) == 0
    assert always.calls["/v1/feedback"] == 4 * NO_RETRY_WAIT.attempts  # bounded
    assert report.errors == ["feedback: HTTP 503: fake 503"]
    assert report.responses == 4  # the answers still count


def test_a_refused_key_stops_the_run_and_a_400_does_not():
    fake = FakeGateway(fail={"/v1/chat/completions": [401] * 100})
    report = run(fake, requests=50, concurrency=1)
    assert report.stopped == "chat: HTTP 401: fake 401" and report.requests == 1
    assert fake.calls["/v1/chat/completions"] == 1  # not retried

    fake = FakeGateway(fail={"/v1/chat/completions": [400]})
    report = run(fake, requests=5, concurrency=1)
    assert report.stopped is None and report.failures["chat"] == 1 and report.responses == 4


def test_an_unreachable_gateway_stops_the_run():
    fake = FakeGateway(fail={"/v1/chat/completions": [httpx.ConnectError("refused")] * 100})
    report = run(fake, requests=50, concurrency=1)
    assert report.stopped == "chat: refused" and report.requests == 1
    assert fake.calls["/v1/chat/completions"] == NO_RETRY_WAIT.attempts


def test_progress_is_reported_per_request():
    seen = []
    run(FakeGateway(), requests=6, on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 6) for i in range(1, 7)]


# ---- the command ---------------------------------------------------------------------------------------

@pytest.fixture
def stack(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path))
    (tmp_path / "credentials.json").write_text(json.dumps({"app_key": "app-key", "operator_key": "op"}))
    fake = FakeGateway()
    monkeypatch.setattr(simulate_cli, "simulate",
                        functools.partial(simulate, transport=httpx.MockTransport(fake), retry=NO_RETRY_WAIT))
    return fake


def cli(*argv: str) -> int:
    args = build_parser().parse_args(["simulate", *argv])
    return args.func(args)


def test_the_command_prints_the_report_as_its_last_line(stack, capsys, tmp_path):
    assert cli("--requests", "12", "--n", "3", "--mix", "comparison=1,ranking=1", "--seed", "2",
               "--hold-out", "0.5", "--max-tokens", "16") == 0
    out, err = capsys.readouterr()
    report = json.loads(out.strip().splitlines()[-1])
    assert report["requests"] == 12 and report["feedback"]["thumbs"] == 0
    # stderr is not a terminal here: a line as each tenth of the 12 requests is passed (console_progress.py).
    assert re.findall(r"\] simulate: (\d+)/12 requests", err) == ["2", "3", "4", "5", "6", "8", "9", "10", "11",
                                                                    "12"]
    assert report["feedback"]["comparison"] + report["feedback"]["ranking"] == 12
    assert {c["max_tokens"] for c in stack.chats} == {16}
    sent = [c["messages"] for c in stack.chats]
    assert not any(prompt_sets.is_held_out(m, 0.5) for m in sent)  # held-out prompts are never sent

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Tell me about volcanoes."}\n')
    assert cli("--requests", "3", "--prompt-file", str(prompts)) == 0
    assert {c["messages"][0]["content"] for c in stack.chats[-3:]} == {"Tell me about volcanoes."}


def test_the_command_refuses_what_cannot_work(stack, capsys, tmp_path, monkeypatch):
    assert cli("--n", "1") == 2  # the default mix has comparisons and rankings
    assert "--n 2" in capsys.readouterr().err
    assert cli("--prompt-file", str(tmp_path / "missing.jsonl")) == 2
    assert cli("--hold-out", "1") == 2
    stack.fail["/v1/chat/completions"] = [401] * 100
    assert cli("--requests", "3") == 1
    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path / "nowhere"))
    assert cli() == 1
    assert "no credentials" in capsys.readouterr().err
    assert stack.feedback == []


def test_demo_win_rate_counts_ties_half_and_judges_without_noise():
    from alignloop.demo import win_rate

    prompts = [[{"role": "user", "content": "Explain volcanoes in simple terms."}]] * 3
    good = {"text": "Volcanoes are openings where molten rock escapes.", "finish_reason": "stop"}
    cut = {"text": "Volcanoes are openings where molten rock", "finish_reason": "length"}
    labeler = Labeler(noise=1.0, seed=0)  # judge() ignores the noise
    assert win_rate(labeler, prompts, [good, good, cut], [cut, good, good]) == pytest.approx(0.5)
    assert win_rate(labeler, prompts[:1], [good], [cut]) == 1.0


def test_demo_answer_stats_count_answers_that_ended_by_themselves():
    from alignloop.demo import answer_stats

    stats = answer_stats([{"text": "Volcanoes erupt.", "finish_reason": "stop"},
                          {"text": "Volcanoes are openings where molten", "finish_reason": "length"}])
    assert stats == {"finished_share": 0.5, "mean_words": 3.5}
    assert answer_stats([]) == {"finished_share": 0.0, "mean_words": 0.0}


def test_the_demos_run_config_is_one_the_runner_accepts():
    import json

    from alignloop.demo import DEMO_CONFIG, MIX
    from pipelines.ppo.args import Args
    from pipelines.ppo.args import validate
    from services.pipeline import config as run_config

    cfg = run_config.resolve("", json.dumps(DEMO_CONFIG))
    assert cfg.ppo["advantage_estimator"] == "rloo"
    validate(Args(**cfg.ppo))  # e.g. rloo needs samples_per_prompt >= 2
    assert abs(sum(MIX.values()) - 1) < 1e-9
