"""Rollouts: answers sampled from the current policy, with the sampler's log-probabilities.

`VLLMRollout` keeps a vLLM engine inside the trainer's process and, after each optimiser step, loads the new
weights into it in place (`reload_weights`, then `reset_prefix_cache`: without the reset, cached prompt
prefixes keep the old weights' KV). The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the
weights go in as tensors, not through a file; see ../shared/PLATFORM.md for the measurements behind this.

`HFRollout` samples with transformers' `generate`: the baseline of benchmarks/ppo_step.py, and a fallback.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.ppo.models import pad_id


@dataclass
class Sample:
    """One sampled answer to one prompt."""

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # the sampler's log π_old(token), one per response token
    text: str
    finish_reason: str


class VLLMRollout:
    """An in-process vLLM engine on the policy's folder; `generate` samples, `load_weights` syncs."""

    def __init__(self, model_dir: Path, *, max_model_len: int, seed: int, dtype: str = "float32",
                 enforce_eager: bool = True, gpu_memory_utilization: float = 0.3, env: dict | None = None) -> None:
        for k, v in (env or {}).items():
            os.environ.setdefault(k, v)
        # In-process engine: weights can be handed over as tensors (a multi-process engine crashes on them).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=max_model_len, seed=seed,
                       enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization,
                       enable_prefix_caching=True)

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, max_tokens: int, temperature: float,
                 top_p: float = 1.0, seed: int | None = None) -> list[Sample]:
        """`n` answers per prompt (token ids), sampled at `temperature`; logprobs are those of the sampling
        distribution only at temperature 1 and top_p 1 (vLLM reports raw logprobs), which PPO uses."""
        from vllm import SamplingParams

        # One seed per prompt: a single seed would give every request of the batch the same random stream,
        # hence the same answers to similar prompts.
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
                                 seed=None if seed is None else seed * 100_003 + i, skip_special_tokens=True)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        samples = []
        for i, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
            for o in sorted(out.outputs, key=lambda o: o.index):
                ids = list(o.token_ids)
                lps = [pos[t].logprob for t, pos in zip(ids, o.logprobs or [], strict=False)]
                samples.append(Sample(i, list(prompt), ids, lps, o.text, o.finish_reason or ""))
        return samples

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Puts the trainer's weights into the engine in place."""
        weights = [(name, t.detach()) for name, t in named_tensors]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def load_folder(self, folder: Path) -> None:
        """Puts a saved model's weights (same architecture) into the engine in place, through the folder
        alignloop/inplace_reload.py gives (a tied output head named, which a plain reload would leave as it
        was): under a second for a 135M model, where a new engine costs seconds more."""
        from alignloop.inplace_reload import reload_folder

        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(reload_folder(folder))})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None),
                                                                 "shutdown", None)
        if shutdown:
            shutdown()
        self.llm = None


class HFRollout:
    """transformers `generate` on a model object (the trainer's own, or a copy)."""

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, max_tokens: int, temperature: float,
                 top_p: float = 1.0, seed: int | None = None) -> list[Sample]:
        device = next(self.model.parameters()).device
        pad = pad_id(self.tokenizer)
        if seed is not None:
            torch.manual_seed(seed)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every answer starts at column `width`
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                  temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_tokens,
                                  num_return_sequences=n, pad_token_id=pad, output_logits=True,
                                  return_dict_in_generate=True)
        self.model.train(was_training)
        sequences = out.sequences[:, width:]
        # top_k=0 above: generation_config defaults (top_k=50) would sample from another distribution than
        # the policy's. Raw (temperature-1) logprobs of the sampled tokens, as vLLM reports them.
        logits = torch.stack(out.logits, 1)
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, sequences.unsqueeze(-1)).squeeze(-1)
        eos = set(self.model.generation_config.eos_token_id if isinstance(
            self.model.generation_config.eos_token_id, list) else [self.model.generation_config.eos_token_id])
        samples = []
        for row in range(sequences.shape[0]):
            prompt_index = row // n
            toks = sequences[row].tolist()
            end = next((k + 1 for k, t in enumerate(toks) if t in eos), len(toks))
            finish = "stop" if end < len(toks) or (toks and toks[-1] in eos) else "length"
            toks = toks[:end]
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            samples.append(Sample(prompt_index, list(prompts[prompt_index]), toks,
                                  logprobs[row, :end].tolist(), text, finish))
        return samples

    def load_weights(self, named_tensors) -> None:
        pass  # it samples from the trainer's model object itself

    def close(self) -> None:
        pass
