"""One registered reward-model version, loaded and ready to score rendered texts."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from alignloop.config import Settings
from alignloop.registry import ModelVersionRef, fetch_version, is_untrained
from alignloop.reward_model import RewardModel, render

log = logging.getLogger("alignloop.reward.model")

# Sequences per forward call inside one batch on a CPU: after sorting by length, chunks of similar lengths pad
# little, and beyond ~16 a CPU forward gains nothing from more rows. A GPU takes the whole batch at once.
CPU_CHUNK = 16


def pick_device(setting: str) -> str:
    """"auto": cuda when torch sees a GPU, else cpu; anything else is taken as a torch device string."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(eq=False)  # compared by identity: the batcher keeps each batch on one loaded version
class ServedModel:
    name: str
    version: str
    folder: Path
    model: RewardModel
    tokenizer: object
    device: str
    untrained: bool

    def score(self, texts: list[str]) -> list[float]:
        """Rewards of rendered texts, in order. Runs in the batcher's worker thread."""
        chunk = CPU_CHUNK if self.device == "cpu" else max(1, len(texts))
        return self.model.score(self.tokenizer, texts, batch_size=chunk)


def load_version(settings: Settings, ref: ModelVersionRef) -> ServedModel:
    """Fetches the version's folder (cached in ALIGNLOOP_HOME/models), loads it and runs one warm-up pass, so
    that the first calls after a swap do not pay for lazy initialisation. Blocking: call it off the event
    loop."""
    started = time.monotonic()
    folder = fetch_version(settings.tracking_uri, ref, settings.models_dir)
    untrained = is_untrained(settings.tracking_uri, ref)
    device = pick_device(settings.reward_device)
    model, tokenizer = RewardModel.load(folder, device=device)
    served = ServedModel(ref.name, ref.version, folder, model, tokenizer, device, untrained)
    served.score([render([{"role": "user", "content": "Hello"}], "Hi! How can I help?")])
    log.info("loaded %s version %s from %s on %s in %.1f s%s", ref.name, ref.version, folder, device,
             time.monotonic() - started, " (untrained placeholder)" if untrained else "")
    return served
