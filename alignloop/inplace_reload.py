"""Loading a saved model's weights into an already built vLLM engine, in place.

Two callers: the policy service when `@champion` moves, and the policy gate, which samples the champion in the
engine it built for the candidate (`VLLMRollout.load_folder`). Both hand vLLM a folder
(`collective_rpc("reload_weights", weights_path=...)`); this module says whether a folder fits an engine, and
which folder to hand over.

vLLM 0.32's layerwise reload puts back a layer's previous tensor when the checkpoint holds no weight for it. A
model whose output head is tied to its input embeddings (SmolLM2, the tiny test model) saves the shared matrix
once, under the embedding's name, so a plain reload would leave the head with the old version's weights: answers
from a mix of two versions. `reload_folder` therefore gives such a folder a companion that also holds the head's
weight under its own name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# config.json fields that must match for weights to be loaded into a running engine.
SHAPE_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")
HEAD_FILE = "tied-output-head.safetensors"


def architecture(folder: Path) -> dict:
    """The shape-defining fields of a transformers folder's config.json."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return {k: config.get(k) for k in SHAPE_KEYS}


def same_architecture(a: Path, b: Path) -> bool:
    return architecture(a) == architecture(b)


def tied_weights(folder: Path) -> dict[str, str]:
    """{output head's name: the embedding's name it is tied to}, from the transformers class of the folder's
    config; empty when the heads are not tied."""
    import transformers

    config = json.loads((Path(folder) / "config.json").read_text())
    if not config.get("tie_word_embeddings", False):
        return {}
    classes = [getattr(transformers, a, None) for a in config.get("architectures") or []]
    keys = next((getattr(c, "_tied_weights_keys", None) for c in classes if c is not None), None)
    return dict(keys) if isinstance(keys, dict) else {}


def reload_folder(folder: Path) -> Path:
    """The folder to hand to `reload_weights` for `folder`'s weights: `folder` itself, or, for a model with tied
    embeddings whose checkpoint lacks the head, its companion `<folder>.reload` beside it (made once): links to
    `folder`'s files plus one file holding each tied head's weight. `folder` itself is never written to (a
    registered version is immutable)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    tied = tied_weights(folder)
    if not tied:
        return folder
    names: dict[str, Path] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            names |= {k: shard for k in f.keys()}
    missing = {head: embed for head, embed in tied.items() if head not in names and embed in names}
    if not missing:
        return folder
    dest = folder.with_name(folder.name + ".reload")
    if (dest / ".complete").exists() and (dest / "config.json").exists():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for item in folder.iterdir():
        if not item.name.startswith("."):  # relative links: the view survives a moved ALIGNLOOP_HOME
            os.symlink(os.path.relpath(item.resolve(), dest.resolve()), partial / item.name)
    heads = {}
    for head, embed in missing.items():
        with safe_open(str(names[embed]), "pt") as f:
            heads[head] = f.get_tensor(embed)
    save_file(heads, str(partial / HEAD_FILE))
    index = partial / "model.safetensors.index.json"
    if index.exists():  # vLLM reads only the shards an index names
        data = json.loads(index.read_text())
        data["weight_map"] |= {head: HEAD_FILE for head in heads}
        index.unlink()  # the link, not the version's own index
        index.write_text(json.dumps(data))
    (partial / ".complete").touch()
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest
