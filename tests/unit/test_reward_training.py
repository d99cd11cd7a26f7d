"""pipelines.reward: HH parsing, snapshot grouping, the InstructGPT loss, training, reward_shift, the gate.

A tiny random BERT (hidden 32, 2 layers, a WordPiece vocabulary; tests/reward_toys.py) stands in for MiniLM;
MLflow is a SQLite file in tmp_path.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

from alignloop.config import Settings
from alignloop.reward_model import RewardModel, render
from pipelines.feedback_export import SCHEMAS
from pipelines.reward import publish
from pipelines.reward.datasets import (PointwiseExample, PreferenceGroup, RewardData, hh_groups, is_held_out,
                                       load_hh, load_snapshot, parse_hh, read_jsonl)
from pipelines.reward.train import (Args, BackboneMismatch, TokenTable, chunks_by_length, forward_rows,
                                    freeze_lower_layers, load_start, make_batch, pair_accuracy,
                                    preference_loss, run, score_texts, scoring_progress, source_metrics,
                                    train)
from tests.reward_toys import QUALITY, TOPICS, answer, build_tiny_bert, conversation, fast_args

HH_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf"


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _pair_row(source: str, group: str, messages: list[dict], chosen: str, rejected: str, ids: tuple[str, str],
              ranks: tuple[int | None, int | None] = (None, None), tenant: str = "t1") -> dict:
    row = {name: None for name in SCHEMAS["pairs"].names}
    row.update(source=source, group=group, ranking_id=group if source == "ranking" else None,
               prompt_hash=f"p-{group}", api_key_hash=tenant,
               messages=json.dumps(messages, sort_keys=True, separators=(",", ":")),
               chosen_completion_id=ids[0], rejected_completion_id=ids[1], chosen=chosen, rejected=rejected,
               chosen_rank=ranks[0], rejected_rank=ranks[1], feedback_id=group, feedback_ids=[group])
    return row


def write_snapshot(folder: Path, pairs: list[dict], pointwise: list[dict] | None = None,
                   digest: str = "ab" * 32) -> Path:
    """A folder in `alignloop feedback export`'s format (only what the trainer reads is filled in)."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(pairs, schema=SCHEMAS["pairs"]), folder / "pairs.parquet")
    points = []
    for p in pointwise or []:
        row = {name: None for name in SCHEMAS["pointwise"].names} | p
        points.append(row)
    pq.write_table(pa.Table.from_pylist(points, schema=SCHEMAS["pointwise"]), folder / "pointwise.parquet")
    (folder / "manifest.json").write_text(json.dumps({"hash": digest, "format_version": 1}))
    return folder


def synthetic_snapshot(folder: Path, *, comparisons: int = 240, rankings: int = 30, seed: int = 0,
                       digest: str = "ab" * 32) -> Path:
    """Chosen answers contain a better quality word than rejected ones: comparisons of good vs bad, and
    rankings of K=4 (excellent > good > okay > bad)."""
    rng = random.Random(seed)
    rows = []
    for i in range(comparisons):
        topic = rng.choice(TOPICS)
        rows.append(_pair_row("comparison", f"c{i}", conversation(topic), answer(rng, "good"),
                              answer(rng, "bad"), (f"c{i}a", f"c{i}b")))
    for i in range(rankings):
        topic = rng.choice(TOPICS)
        answers = [answer(rng, q) for q in QUALITY]
        for a in range(4):
            for b in range(a + 1, 4):
                rows.append(_pair_row("ranking", f"r{i}", conversation(topic), answers[a], answers[b],
                                      (f"r{i}-{a}", f"r{i}-{b}"), (a, b)))
    return write_snapshot(folder, rows, digest=digest)


def settings_for(tmp_path: Path) -> Settings:
    """MLflow in a SQLite file in tmp_path; its default artifact root (./mlruns) lands in tmp_path too, since
    the registry tests chdir there (the `in_tmp` fixture)."""
    return Settings(home=tmp_path / "home", mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- HH-RLHF ---------------------------------------------------------------------------------------------
def test_parse_hh_splits_at_the_last_assistant_turn() -> None:
    t = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 4."
    messages, response = parse_hh(t)
    assert messages == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "What is 2+2?"}]
    assert response == "It is 4."
    assert render(messages, response) == t
    # Extra spaces after the marker belong to the text; an inline "Human:" is not a turn.
    t2 = "\n\nHuman: a  Human: b\n\nAssistant:  two spaces"
    assert parse_hh(t2) == ([{"role": "user", "content": "a  Human: b"}], " two spaces")
    assert render(*parse_hh(t2)) == t2
    # Text before the first turn is kept, as a system message.
    system = {"role": "system", "content": "Be nice."}
    assert parse_hh("Be nice.\n\nHuman: hi\n\nAssistant: hey")[0][0] == system
    with pytest.raises(ValueError):
        parse_hh("\n\nHuman: no answer")


def test_hh_groups_drop_identical_and_unparsable_pairs() -> None:
    rows = [{"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"},
            {"chosen": "\n\nHuman: q\n\nAssistant: same", "rejected": "\n\nHuman: q\n\nAssistant: same"},
            {"chosen": "\n\nHuman: q", "rejected": "\n\nHuman: q\n\nAssistant: no"}]
    groups, dropped = hh_groups(rows, "x")
    assert dropped == {"identical_pairs": 1, "unparsable": 1}
    assert len(groups) == 1 and groups[0].pairs == ((0, 1),) and groups[0].source == "x"
    assert groups[0].texts == ("\n\nHuman: q\n\nAssistant: yes", "\n\nHuman: q\n\nAssistant: no")


@pytest.mark.skipif(not HH_DIR.exists(), reason="../shared/data/hh-rlhf is not here")
def test_hh_parser_on_real_lines() -> None:
    rows = read_jsonl(HH_DIR / "helpful-base.test.jsonl.gz")[:50]
    for row in rows:
        for side in ("chosen", "rejected"):
            messages, response = parse_hh(row[side])
            assert messages[0]["role"] == "user"
            assert {m["role"] for m in messages} <= {"user", "assistant"}
            # The RM sees exactly the original transcript.
            assert render(messages, response) == row[side]
    data = load_hh([HH_DIR / "helpful-base.test.jsonl.gz"], [HH_DIR / "harmless-base.test.jsonl.gz"],
                   limit=20, eval_limit=10)
    assert (data.train_pairs, data.eval_pairs) == (20, 10)
    assert len(data.digest) == 12 and set(data.inputs) == {"training", "evaluation"}
    assert data.inputs["evaluation"].source.endswith("harmless-base.test.jsonl.gz")


# ---- snapshots and the C(K,2) grouping ---------------------------------------------------------------------
def test_a_ranking_of_four_is_one_group_of_six_pairs_and_four_forwards(tmp_path: Path,
                                                                        backbone: Path) -> None:
    msgs = conversation("cats")
    answers = ["excellent cats.", "good cats.", "okay cats.", "bad cats."]
    rows = [_pair_row("ranking", "r1", msgs, answers[a], answers[b], (f"id{a}", f"id{b}"), (a, b))
            for a in range(4) for b in range(a + 1, 4)]
    rows.append(_pair_row("comparison", "c1", msgs, "good dogs.", "bad dogs.", ("x", "y")))
    data = load_snapshot(write_snapshot(tmp_path / "snap", rows), eval_fraction=0.0)
    groups = {g.group_id: g for g in data.train_groups}
    ranking = groups["r1"]
    assert len(ranking.texts) == 4 and len(ranking.pairs) == 6
    assert ranking.texts == tuple(render(msgs, a) for a in answers)
    assert set(ranking.pairs) == {(a, b) for a in range(4) for b in range(a + 1, 4)}
    assert len(groups) == 2 and data.train_pairs == 7

    model, tokenizer = load_start(backbone, Args(max_length=64), torch.device("cpu"))
    table = TokenTable(tokenizer, [t for g in data.train_groups for t in g.texts], 64)
    batch = make_batch([ranking], table)
    assert len(batch.rows) == 4  # K forwards, not 2·C(K,2) = 12
    assert (batch.n_pairs, batch.n_groups) == (6, 1)
    both = make_batch(data.train_groups, table)
    assert (len(both.rows), both.n_pairs, both.n_groups) == (6, 7, 2)


def test_length_sorted_chunks_give_the_rewards_of_one_padded_forward(tmp_path: Path, backbone: Path) -> None:
    rng = random.Random(2)
    texts = [render(conversation(rng.choice(TOPICS)), answer(rng, rng.choice(QUALITY)) * rng.randint(1, 4))
             for _ in range(12)]
    model, tokenizer = load_start(backbone, Args(max_length=64), torch.device("cpu"))
    table = TokenTable(tokenizer, texts, 64)
    rows = list(range(len(texts)))
    assert len(chunks_by_length(rows, table, 64)) > 3  # really cut up
    chunked = forward_rows(model, rows, table, 64, torch.device("cpu"))
    whole = forward_rows(model, rows, table, 10**9, torch.device("cpu"))
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)
    chunked.sum().backward()
    grad = model.head.weight.grad.clone()
    model.zero_grad()
    whole.sum().backward()
    torch.testing.assert_close(grad, model.head.weight.grad, rtol=1e-4, atol=1e-5)


def test_the_loss_is_the_mean_over_groups_of_the_mean_over_pairs() -> None:
    rewards = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.3, 0.7])
    # Group 0: a ranking of 4 (rows 0..3, best first); group 1: one pair where the loser scores higher.
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    winners = torch.tensor([a for a, _ in pairs] + [4])
    losers = torch.tensor([b for _, b in pairs] + [5])
    pair_group = torch.tensor([0] * 6 + [1])
    loss = preference_loss(rewards, winners, losers, pair_group, n_groups=2)

    def nll(margin: float) -> float:
        return -math.log(1 / (1 + math.exp(-margin)))

    r = rewards.tolist()
    by_hand = (sum(nll(r[a] - r[b]) for a, b in pairs) / 6 + nll(0.3 - 0.7)) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # Not the mean over all 7 pairs: the ranking counts once, like the single comparison.
    assert loss.item() != pytest.approx((sum(nll(r[a] - r[b]) for a, b in pairs) + nll(-0.4)) / 7, rel=1e-3)


def test_snapshot_split_is_by_group_and_deterministic(tmp_path: Path) -> None:
    folder = synthetic_snapshot(tmp_path / "snap", comparisons=100, rankings=20)
    a = load_snapshot(folder, eval_fraction=0.3)
    b = load_snapshot(folder, eval_fraction=0.3)
    assert [g.group_id for g in a.eval_groups] == [g.group_id for g in b.eval_groups]
    train_ids, eval_ids = {g.group_id for g in a.train_groups}, {g.group_id for g in a.eval_groups}
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == 120
    assert all(is_held_out(g.group_id.split("/")[0], 0.3) for g in a.eval_groups)
    # Whole rankings on one side, and roughly the asked share held out.
    assert all(len(g.pairs) == 6 for g in a.eval_groups if g.source == "ranking")
    assert 0.15 < len(eval_ids) / 120 < 0.45
    assert a.digest == "ab" * 6 and a.name == "feedback-" + "ab" * 6


def test_thumbs_pairs_are_single_groups_and_pointwise_follows_their_split(tmp_path: Path) -> None:
    msgs = conversation("tea")
    rows = [_pair_row("thumbs", "thumbs:t1:P", msgs, "good tea.", "bad tea.", ("u1", "d1")),
            _pair_row("thumbs", "thumbs:t1:P", msgs, "good tea!", "bad tea.", ("u2", "d1"))]
    for r in rows:
        r["prompt_hash"] = "P"
    points = [{"feedback_id": f"f{i}", "kind": "thumbs", "api_key_hash": "t1", "prompt_hash": "P",
               "messages": rows[0]["messages"], "response": text, "label": label}
              for i, (text, label) in enumerate([("good tea.", 1.0), ("bad tea.", 0.0)])]
    folder = write_snapshot(tmp_path / "snap", rows, points)
    data = load_snapshot(folder, eval_fraction=0.0)
    assert [len(g.pairs) for g in data.train_groups] == [1, 1]
    assert data.train_pointwise == [PointwiseExample(render(msgs, "good tea."), 1.0),
                                    PointwiseExample(render(msgs, "bad tea."), 0.0)]
    held = load_snapshot(folder, eval_fraction=1.0)  # the prompt is held out: so are its votes
    assert held.train_pointwise == [] and held.eval_pairs == 2


# ---- training --------------------------------------------------------------------------------------------
def test_training_learns_synthetic_preferences(tmp_path: Path, backbone: Path) -> None:
    data = load_snapshot(synthetic_snapshot(tmp_path / "snap"), eval_fraction=0.2)
    assert data.train_pairs > 200 and data.eval_pairs > 30
    summary = run(settings_for(tmp_path), data, fast_args(backbone), register=False, out=tmp_path / "rm")
    assert summary["eval_accuracy"] >= 0.9
    assert summary["train_pairs"] == data.train_pairs and summary["pairs_per_s"] > 0
    assert summary["model_version"] is None and summary["promoted"] is False
    # Held-out accuracy per kind of feedback: every kind in the split, every pair once, the same mean.
    by_source = summary["eval_accuracy_by_source"]
    eval_pairs = {}
    for g in data.eval_groups:
        eval_pairs[g.source] = eval_pairs.get(g.source, 0) + len(g.pairs)
    assert len(eval_pairs) > 1 and {k: v["pairs"] for k, v in by_source.items()} == eval_pairs
    assert sum(v["pairs"] * v["eval_accuracy"] for v in by_source.values()) / data.eval_pairs == \
        pytest.approx(summary["eval_accuracy"])

    # The saved folder is what the reward service loads; its rewards average 0 over the training answers.
    model, tokenizer = RewardModel.load(tmp_path / "rm")
    train_texts = list(dict.fromkeys(t for g in data.train_groups for t in g.texts))
    assert abs(sum(score_texts(model, tokenizer, train_texts)) / len(train_texts)) < 1e-3
    assert model.config.reward_shift == pytest.approx(summary["reward_shift"])
    assert model.config.reward_shift != 0.0
    assert pair_accuracy(model, tokenizer, data.eval_groups)[0] == pytest.approx(summary["eval_accuracy"])
    assert model.config.max_length == 64


def test_training_is_deterministic(tmp_path: Path, backbone: Path) -> None:
    data = load_snapshot(synthetic_snapshot(tmp_path / "snap", comparisons=40, rankings=4), eval_fraction=0.2)
    a = run(settings_for(tmp_path), data, fast_args(backbone, epochs=1), register=False, out=tmp_path / "a")
    b = run(settings_for(tmp_path), data, fast_args(backbone, epochs=1), register=False, out=tmp_path / "b")
    assert a["final_loss"] == b["final_loss"] and a["reward_shift"] == b["reward_shift"]


def test_scoring_reports_progress_and_a_log_file_gets_a_line_per_tenth(tmp_path: Path,
                                                                       backbone: Path) -> None:
    data = load_snapshot(synthetic_snapshot(tmp_path / "snap", comparisons=40, rankings=4), eval_fraction=0.2)
    model, tokenizer = load_start(str(backbone), fast_args(backbone), torch.device("cpu"))
    texts = list(dict.fromkeys(t for g in data.train_groups for t in g.texts))
    calls: list[tuple[int, int]] = []
    scores = score_texts(model, tokenizer, texts, batch_size=8, on_batch=lambda d, t: calls.append((d, t)))
    assert calls == [(min(8 * k, len(texts)), len(texts)) for k in range(1, math.ceil(len(texts) / 8) + 1)]
    assert scores == score_texts(model, tokenizer, texts, batch_size=8)

    # Not a terminal (a log file): a line at each tenth and at the end, not one per batch.
    log = io.StringIO()
    console = Console(file=log, force_terminal=False, width=200)
    with scoring_progress(console, "scoring the held-out answers") as on_batch:
        for done in range(1, 101):
            on_batch(done, 100)
    lines = [line for line in log.getvalue().splitlines() if "answers scored" in line]
    assert [line.split(": ")[1].split()[0] for line in lines] == [f"{10 * k}/100" for k in range(1, 11)]


def test_the_head_has_its_own_learning_rate(tmp_path: Path, backbone: Path) -> None:
    """head_lr moves the head alone when the backbone's rate is 0; without it the head takes lr (0 here)."""
    data = load_snapshot(synthetic_snapshot(tmp_path / "snap", comparisons=16, rankings=0), eval_fraction=0.2)
    for head_lr, head_moves in ((1e-2, True), (None, False)):
        model, tokenizer = load_start(backbone, Args(max_length=64), torch.device("cpu"))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        args = fast_args(backbone, lr=0.0, head_lr=head_lr, epochs=1)
        train(model, tokenizer, data, args, torch.device("cpu"))
        moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        # (The bias cancels in r_w - r_l: it moves only by Adam's reading of rounding noise, if at all.)
        assert moved <= {"head.weight", "head.bias"} and ("head.weight" in moved) == head_moves


def test_freeze_layers_keeps_the_embeddings_and_the_lower_blocks_as_they_were(tmp_path: Path,
                                                                             backbone: Path) -> None:
    data = load_snapshot(synthetic_snapshot(tmp_path / "snap", comparisons=16, rankings=0), eval_fraction=0.2)
    args = fast_args(backbone, epochs=1, freeze_layers=1)
    model, tokenizer = load_start(backbone, args, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, tokenizer, data, args, torch.device("cpu"))
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    frozen = {k for k in before if k.startswith(("backbone.embeddings.", "backbone.encoder.layer.0."))}
    assert frozen and not moved & frozen
    assert any(k.startswith("backbone.encoder.layer.1.") for k in moved) and "head.weight" in moved

    # The same rule on a decoder (the policy's architecture): the token embeddings and block 0.
    from transformers import LlamaConfig, LlamaModel
    llama = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2))
    names = freeze_lower_layers(llama, 1)
    assert names[0] == "embed_tokens.weight" and all(n.startswith("layers.0.") for n in names[1:])
    assert {n for n, w in llama.named_parameters() if not w.requires_grad} == set(names)
    with pytest.raises(ValueError, match="freeze_layers"):
        freeze_lower_layers(llama, 4)
    assert freeze_lower_layers(LlamaModel(llama.config), 0) == []

    # A backbone whose blocks cannot be found: 0 asks nothing of it, any other depth is refused plainly.
    odd = torch.nn.Sequential(torch.nn.Linear(2, 2))
    odd.config = SimpleNamespace()
    assert freeze_lower_layers(odd, 0) == []
    with pytest.raises(BackboneMismatch, match="no list of num_hidden_layers blocks"):
        freeze_lower_layers(odd, 1)


def test_per_source_metric_names_are_ones_mlflow_takes() -> None:
    from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name

    by_source = {name: {"pairs": 1, "eval_accuracy": 0.5}
                 for name in ("ranking", "my data (1).jsonl.gz", "räte+ränk", "..", "")}
    metrics = source_metrics(by_source)
    assert set(metrics) == {"eval_accuracy/ranking", "eval_accuracy/my data _1_.jsonl.gz",
                            "eval_accuracy/räte_ränk"}
    assert all(validate_param_and_metric_name(k) and not path_not_unique(k) for k in metrics)


def test_pointwise_term_trains_on_unpaired_thumbs(tmp_path: Path, backbone: Path) -> None:
    rng = random.Random(1)
    msgs = conversation("bread")
    # Training data: thumbs without a counterpart only; held-out pairs to measure what they taught.
    held_out = [PreferenceGroup(f"c{i}", tuple(render(msgs, answer(rng, q)) for q in ("good", "bad")),
                                ((0, 1),)) for i in range(40)]
    points = [PointwiseExample(render(msgs, answer(rng, q)), float(q == "good"))
              for q in ["good", "bad"] * 100]
    data = RewardData(train_groups=[], eval_groups=held_out, train_pointwise=points, name="points",
                      hash="cd" * 32, source="test")
    summary = run(settings_for(tmp_path), data, fast_args(backbone, pointwise_weight=1.0), register=False,
                  out=tmp_path / "rm")
    assert summary["train_pairs"] == 0 and summary["eval_accuracy"] >= 0.9
    # Without the pointwise term nothing is learned from them (no step is even taken).
    pairs_only = run(settings_for(tmp_path), data, fast_args(backbone), register=False, out=tmp_path / "rm0")
    assert pairs_only["steps"] == 0


# ---- the gate and the registry --------------------------------------------------------------------------
def test_gate_decisions() -> None:
    assert publish.decide(0.5, None, 0.0, has_champion=False).promoted
    assert publish.decide(0.1, 0.9, 0.0, has_champion=True, champion_untrained=True).promoted
    assert publish.decide(0.8, 0.8, 0.0, has_champion=True).promoted
    assert not publish.decide(0.79, 0.8, 0.0, has_champion=True).promoted
    assert publish.decide(0.79, 0.8, 0.02, has_champion=True).promoted
    assert not publish.decide(None, 0.8, 0.0, has_champion=True).promoted


def test_register_promote_and_refuse(in_tmp: Path, backbone: Path) -> None:
    tmp_path = in_tmp
    from mlflow import MlflowClient

    settings = settings_for(tmp_path)
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    name = settings.reward_model_name
    data = load_snapshot(synthetic_snapshot(tmp_path / "snap"), eval_fraction=0.2)

    # 1. No champion yet: an untrained model (no step taken) becomes champion, tagged as untrained.
    first = run(settings, data, fast_args(backbone, epochs=0), register=True)
    assert first["promoted"] and first["model_version"] == "1" and first["champion_version"] is None
    v1 = client.get_model_version(name, "1")
    assert v1.tags["alignloop.untrained"] == "true" and v1.aliases == ["champion"]

    # 2. A trained model beats the untrained placeholder.
    second = run(settings, data, fast_args(backbone), register=True)
    assert second["promoted"] and second["champion_version"] == "1" and second["eval_accuracy"] >= 0.9
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"

    # 3. A broken one (no training) is refused: the alias stays, both accuracies are recorded.
    third = run(settings, data, fast_args(backbone, epochs=0, seed=3), register=True)
    assert not third["promoted"] and third["champion_version"] == "2"
    assert third["champion_eval_accuracy"] == pytest.approx(second["eval_accuracy"])
    assert third["eval_accuracy"] < third["champion_eval_accuracy"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    v3 = client.get_model_version(name, "3")
    assert v3.tags["alignloop.promoted"] == "false"
    recorded = float(v3.tags["alignloop.champion_eval_accuracy"])
    assert recorded == pytest.approx(third["champion_eval_accuracy"])
    assert v3.tags["alignloop.dataset_hash"] == "ab" * 32 and v3.tags["alignloop.backbone"] == backbone.name

    # 4. A generous tolerance lets an equal-or-slightly-worse model through.
    fourth = run(settings, data, fast_args(backbone, epochs=1, seed=4), register=True, gate_tolerance=1.0)
    assert fourth["promoted"] and str(client.get_model_version_by_alias(name, "champion").version) == "4"

    # The run cites the snapshot as its dataset, and logged per-step losses and the eval accuracy.
    run_info = client.get_run(client.get_model_version(name, "2").run_id)
    dataset = run_info.inputs.dataset_inputs[0].dataset
    assert (dataset.name, dataset.digest) == ("feedback-pairs", "ab" * 6)  # as `feedback export` logs it
    assert str(tmp_path / "snap") in dataset.source and "eval_accuracy" in run_info.data.metrics
    for source, figures in second["eval_accuracy_by_source"].items():
        assert run_info.data.metrics[f"eval_accuracy/{source}"] == pytest.approx(figures["eval_accuracy"])
    assert len(client.get_metric_history(run_info.info.run_id, "loss")) == second["steps"]

    # Fine-tuning the champion: "@champion" as the backbone records the base version.
    fifth = run(settings, data, fast_args(backbone, backbone="@champion", epochs=1), register=True)
    assert client.get_model_version(name, fifth["model_version"]).tags["alignloop.base_reward_version"] == "4"
    assert fifth["eval_accuracy"] >= 0.9


def test_the_pipeline_runner_sees_one_fraction_rise_through_every_stage(
        in_tmp: Path, backbone: Path, progress_reports: tuple[Path, list[dict]]) -> None:
    """Training, scoring the held-out answers, scoring for reward_shift and scoring the champion each
    report their own count; the progress file (ALIGNLOOP_PROGRESS_FILE, which the runner follows) holds one
    fraction of the whole job that only rises, and names the stage it is in."""
    from alignloop import progress

    tmp_path = in_tmp
    settings = settings_for(tmp_path)
    data = load_snapshot(synthetic_snapshot(tmp_path / "snap", comparisons=40, rankings=4), eval_fraction=0.2)
    # A champion for the gate to score.
    assert run(settings, data, fast_args(backbone, epochs=1), register=True)["promoted"]

    path, seen = progress_reports
    seen.clear()  # from here on: what the runner would read of the second job
    summary = run(settings, data, fast_args(backbone, epochs=2, seed=1), register=True)

    done = [r["done"] for r in seen]
    assert done == sorted(done) and done[-1] == 1000 and progress.read(path) == seen[-1]
    stages = list(dict.fromkeys(r["detail"].split(" ")[0] for r in seen))
    assert stages == ["training", "held-out", "reward_shift", "champion"]
    assert f"training {summary['steps']}/{summary['steps']}" in [r["detail"] for r in seen]
    # Shares in answers forwarded: training three forwards per answer per epoch (two epochs), then the
    # held-out answers, the training answers for reward_shift, and the held-out answers again (the champion).
    trained = len({t for g in data.train_groups for t in g.texts})
    held_out = len({t for g in data.eval_groups for t in g.texts})
    end_of_training = max(r["done"] for r in seen if r["detail"].startswith("training"))
    assert abs(end_of_training - 1000 * 6 * trained / (7 * trained + 2 * held_out)) <= 1


def test_an_untrained_placeholder_champion_is_always_beaten(in_tmp: Path, backbone: Path) -> None:
    tmp_path = in_tmp
    from mlflow import MlflowClient

    settings = settings_for(tmp_path)
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    data = load_snapshot(synthetic_snapshot(tmp_path / "snap", comparisons=60, rankings=5), eval_fraction=0.3)
    # Someone else's placeholder: a perfectly good model, but tagged untrained.
    good = run(settings, data, fast_args(backbone), register=True)
    client.set_model_version_tag(settings.reward_model_name, good["model_version"], "alignloop.untrained",
                                 "true")
    broken = run(settings, data, fast_args(backbone, epochs=0), register=True)
    assert broken["promoted"] and broken["champion_eval_accuracy"] is None
    assert str(client.get_model_version_by_alias(settings.reward_model_name, "champion").version) == \
        broken["model_version"]


# ---- the command -----------------------------------------------------------------------------------------
def test_cli_trains_the_newest_snapshot_and_prints_a_json_summary(
        tmp_path: Path, backbone: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    from alignloop import cli

    home = tmp_path / "home"
    monkeypatch.setenv("ALIGNLOOP_HOME", str(home))
    datasets = home / "datasets"
    synthetic_snapshot(datasets / "feedback-20260101T000000Z-aaaaaaaaaaaa", comparisons=20, rankings=2,
                       digest="aa" * 32)
    synthetic_snapshot(datasets / "feedback-20260102T000000Z-bbbbbbbbbbbb", comparisons=60, rankings=5,
                       digest="bb" * 32)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["reward", "train", "--backbone", str(backbone), "--no-register", "--epochs", "2",
                  "--lr", "3e-3", "--max-length", "64", "--out", str(tmp_path / "rm")])
    assert exit_.value.code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dataset_hash"] == "bb" * 32  # the newest snapshot
    assert {"eval_accuracy", "model_version", "promoted", "champion_eval_accuracy", "pairs_per_s",
            "train_pairs", "eval_pairs"} <= set(summary)
    assert summary["train_pairs"] + summary["eval_pairs"] == 60 + 5 * 6
    assert (tmp_path / "rm" / "reward_config.json").exists()

    with pytest.raises(SystemExit) as exit_:
        cli.main(["reward", "train", "--train", str(tmp_path / "x.jsonl")])  # --eval missing
    assert exit_.value.code == 2

    with pytest.raises(SystemExit) as exit_:  # the tiny BERT has 2 blocks
        cli.main(["reward", "train", "--backbone", str(backbone), "--no-register", "--freeze-layers", "3"])
    assert exit_.value.code == 2 and "freeze_layers must be between 0 and" in capsys.readouterr().err
