"""alignloop.inplace_reload: which folder a promotion hands to vLLM's in-place reload."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from alignloop.inplace_reload import HEAD_FILE, architecture, reload_folder, same_architecture, tied_weights
from pipelines.models_init import build_tiny_policy


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return build_tiny_policy(tmp_path_factory.mktemp("tied") / "m", max_position_embeddings=64)


def keys(folder):
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def test_a_tied_checkpoint_gets_a_companion_that_names_the_head(tied, tmp_path):
    assert tied_weights(tied) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in keys(tied)  # saved once, as the embedding: what a plain reload would miss
    view = reload_folder(tied)
    assert view == tied.with_name("m.reload")
    weights = keys(view)
    assert (weights["lm_head.weight"] == weights["model.embed_tokens.weight"]).all()
    assert (view / HEAD_FILE).exists() and (view / "config.json").is_symlink()
    assert sorted(p.name for p in tied.iterdir() if not p.name.startswith(".")) == \
        sorted(p.name for p in view.iterdir() if p.name != HEAD_FILE and not p.name.startswith("."))
    assert not (tied / HEAD_FILE).exists()  # the version's own folder is left as it was
    stamp = (view / HEAD_FILE).stat().st_mtime_ns
    assert reload_folder(tied) == view and (view / HEAD_FILE).stat().st_mtime_ns == stamp  # made once


def test_the_companion_survives_a_moved_home(tmp_path):
    home = tmp_path / "home"
    version = build_tiny_policy(home / "models" / "v1", max_position_embeddings=64)
    reload_folder(version)
    moved = tmp_path / "moved"
    home.rename(moved)
    view = reload_folder(moved / "models" / "v1")
    assert view == moved / "models" / "v1.reload"
    assert "lm_head.weight" in keys(view) and (view / "config.json").read_text()


def test_an_untied_checkpoint_is_reloaded_from_its_own_folder(tmp_path):
    untied = build_tiny_policy(tmp_path / "untied", max_position_embeddings=64, tie_word_embeddings=False)
    assert tied_weights(untied) == {}
    assert reload_folder(untied) == untied
    assert not (tmp_path / "untied.reload").exists()


def test_architecture_compares_shapes_only(tied, tmp_path):
    other = build_tiny_policy(tmp_path / "seed1", max_position_embeddings=64, seed=1)
    assert same_architecture(tied, other)  # other weights, same shapes
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (other / "config.json").write_text(json.dumps(config))
    assert not same_architecture(tied, other)
    assert architecture(other)["num_hidden_layers"] == architecture(tied)["num_hidden_layers"] + 1


def test_a_sharded_checkpoint_gets_the_head_in_its_index(tmp_path):
    from transformers import AutoModelForCausalLM

    small = build_tiny_policy(tmp_path / "small", max_position_embeddings=64)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(small)).save_pretrained(str(sharded), max_shard_size="200KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    view = reload_folder(sharded)
    assert view == tmp_path / "sharded.reload"
    weight_map = json.loads((view / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map["lm_head.weight"] == HEAD_FILE
    assert not (view / "model.safetensors.index.json").is_symlink()
    assert "lm_head.weight" not in json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    weights = keys(view)
    assert (weights["lm_head.weight"] == weights["model.embed_tokens.weight"]).all()
