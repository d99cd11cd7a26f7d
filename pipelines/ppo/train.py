"""PPO against a reward model with a per-token KL penalty (InstructGPT §3.5), one readable file in the
manner of CleanRL's ppo.py. The arithmetic lives in pipelines/ppo/core.py.

One iteration:
  1. rollout     `prompts_per_iteration` prompts × `samples_per_prompt` answers from the current policy,
                 sampled by the in-process vLLM engine (pipelines/ppo/rollout.py)
  2. score       the RM's reward of each answer (the reward service, the RM in-process, or a function)
  3. evaluate    log π_old, log π_ref and V_old of every answer token, by the trainer's own forward passes
                 (vLLM's logprobs are only compared with them: the `logprob_gap` metric)
  4. advantages  r_t = −beta·(log π_old − log π_ref) (+ RM score on the last token); GAE(gamma, lam), or
                 with `advantage_estimator="rloo"` no critic: the answer's return minus the mean return of
                 the other answers to its prompt; advantages whitened over the batch
  5. optimise    `ppo_epochs` passes over shuffled minibatches: clipped surrogate (`clip_range`), clipped
                 value loss (`clip_range_value`, with a critic), optional PPO-ptx (`gamma_ptx` × LM loss on demonstrations)
  6. sync        the new policy weights into the vLLM engine in place
  7. beta        the adaptive KL controller (if `kl_target`) moves beta towards the target KL

With `lora_rank` > 0 only peft adapters are trained (pipelines/ppo/lora.py): π_ref is the policy's network
with its adapters off, and the engine gets the merged weights.

Data parallel with torchrun: every rank has its own engine and its own share of the prompts; DDP averages
gradients, so every rank holds the same weights after each step. Rank 0 logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from pipelines.ppo import core, lora
from pipelines.ppo.args import Args, validate
from pipelines.ppo.models import (
    RolloutBatch,
    ValueModel,
    demonstration_ids,
    load_policy,
    pack,
    pad_id,
    policy_forward,
    prompt_token_ids,
    save_policy,
)
from pipelines.training import pick_device


# ---- distributed --------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """torchrun's environment → a process group (NCCL on CUDA, gloo on CPU); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def all_mean(values: dict[str, float], d: Dist) -> dict[str, float]:
    """The mean of each metric over ranks."""
    if d.world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / d.world for k, v in zip(keys, t.tolist(), strict=True)}


# ---- checkpoints ----------------------------------------------------------------------------------------
def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def save_checkpoint(folder: Path, iteration: int, policy, critic, optimizers: dict, kl_ctl, extra: dict) -> None:
    """Everything needed to continue exactly: weights, optimiser and scheduler state, beta, RNG states.
    Written to a temporary folder, then renamed: a kill mid-write leaves the previous checkpoint intact."""
    final = folder / f"iter-{iteration:06d}"
    partial = folder / f".iter-{iteration:06d}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    policy, critic = _unwrap(policy), _unwrap(critic) if critic is not None else None
    if lora.is_lora(policy):  # only what is trained: adapters and the critic's head
        torch.save(lora.trainable_state(policy), partial / "policy_adapters.pt")
        critic_state = lora.trainable_state(critic) if critic is not None else None
    else:
        policy.save_pretrained(str(partial / "policy"), safe_serialization=True)
        critic_state = critic.state_dict() if critic is not None else None
    torch.save({"critic": critic_state,
                "optimizers": {k: v.state_dict() for k, v in optimizers.items()},
                "beta": kl_ctl.beta, "iteration": iteration,
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                "extra": extra}, partial / "state.pt")
    if final.exists():  # the same iteration saved again (a re-run after a stop): the new one wins
        shutil.rmtree(final)
    os.replace(partial, final)
    pointer = folder / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, folder / "latest")


def latest_checkpoint(folder: Path) -> Path | None:
    pointer = folder / "latest"
    if not pointer.exists():
        return None
    path = folder / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def load_checkpoint(path: Path, policy, critic, optimizers: dict, kl_ctl) -> dict:
    from safetensors.torch import load_file

    state = torch.load(path / "state.pt", weights_only=False)
    policy, critic = _unwrap(policy), _unwrap(critic) if critic is not None else None
    if (critic is None) != (state["critic"] is None):
        raise ValueError(f"checkpoint {path} was written {'with' if critic is None else 'without'} a critic: "
                         "resume with the run's own --advantage-estimator, or start afresh (--no-resume)")
    if lora.is_lora(policy) != (path / "policy_adapters.pt").exists():
        raise ValueError(f"checkpoint {path} was written {'without' if lora.is_lora(policy) else 'with'} LoRA: "
                         "resume with the run's own --lora-rank, or start afresh (--no-resume)")
    if lora.is_lora(policy):
        lora.load_trainable_state(policy, torch.load(path / "policy_adapters.pt"))
        if critic is not None:
            lora.load_trainable_state(critic, state["critic"])
    else:
        weights = {}
        for f in sorted((path / "policy").glob("*.safetensors")):
            weights |= load_file(str(f))
        missing, unexpected = policy.load_state_dict(weights, strict=False)
        # Tied embeddings are saved once; anything else missing means a different architecture.
        if unexpected or any("lm_head" not in k for k in missing):
            raise ValueError(f"checkpoint {path} does not fit this policy (missing {missing}, "
                             f"unexpected {unexpected})")
        if critic is not None:
            critic.load_state_dict(state["critic"])
    for k, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][k])
    kl_ctl.beta = state["beta"]
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


# ---- one iteration ---------------------------------------------------------------------------------------
@dataclass
class Rollouts:
    batch: RolloutBatch
    scores: torch.Tensor  # [B] RM scores (after clipping and penalties)
    sampler_logprobs: torch.Tensor  # [B, T] what the engine reported
    finish_reasons: list[str]
    groups: torch.Tensor  # [B] which prompt each answer is to (the leave-one-out baseline's groups)


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """The sampling seed of one rank's iteration: a resumed run samples what the uninterrupted one would."""
    return (seed * 1_000_003 + iteration * 1009 + rank) % (2**31 - 1)


class Timer:
    """Seconds per phase of one iteration: `with timer("training"): ...` adds to seconds["training"]."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def collect(engine, reward, tokenizer, prompts: Sequence[list], args: Args, iteration: int, d: Dist,
            timer: Timer) -> Rollouts:
    """Steps 1–2: sample answers and score them."""
    prompt_ids = [prompt_token_ids(tokenizer, m) for m in prompts]
    with timer("generation"):
        samples = engine.generate(prompt_ids, n=args.samples_per_prompt, max_tokens=args.max_new_tokens,
                                  temperature=args.temperature, seed=iteration_seed(args.seed, iteration, d.rank))
    with timer("scoring"):
        scores = torch.tensor(reward.score([prompts[s.prompt_index] for s in samples], [s.text for s in samples]),
                              dtype=torch.float32)
    if args.reward_clip is not None:
        scores = scores.clamp(-args.reward_clip, args.reward_clip)
    finish = [s.finish_reason for s in samples]
    if args.missing_eos_penalty is not None:
        scores = scores - args.missing_eos_penalty * torch.tensor([f == "length" for f in finish], dtype=torch.float32)
    batch = pack([s.prompt_ids for s in samples], [s.response_ids for s in samples], pad_id(tokenizer))
    sampler = torch.zeros_like(batch.response_mask)
    for i, s in enumerate(samples):
        if s.logprobs:
            sampler[i, :len(s.logprobs)] = torch.tensor(s.logprobs)
    groups = torch.tensor([s.prompt_index for s in samples], dtype=torch.long)
    return Rollouts(batch, scores, sampler, finish, groups)


def minibatches(n: int, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return [order[i:i + size] for i in range(0, n, size)]


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def reference_logprobs(reference, policy, batch: RolloutBatch) -> torch.Tensor:
    """log π_ref of the answer tokens: from the reference network, or (LoRA, reference = None) from the
    policy's own network with its adapters switched off."""
    if reference is not None:
        return policy_forward(reference, batch)[0]
    module = _unwrap(policy)
    with module.disable_adapter():
        return policy_forward(module, batch)[0]


def ptx_loss(policy, ptx_batch: RolloutBatch) -> torch.Tensor:
    """Mean negative log-likelihood of demonstration answers (InstructGPT's PPO-ptx term, on SFT data)."""
    logprobs, _ = policy_forward(policy, ptx_batch)
    return -core.masked_mean(logprobs, ptx_batch.response_mask)


def ppo_iteration(policy, reference, critic, optimizers: dict, kl_ctl, ro: Rollouts, args: Args,
                  device: torch.device, iteration: int, *, ptx_sampler: Callable[[], RolloutBatch] | None,
                  timer: Timer) -> dict[str, float]:
    """Steps 3–5 on one rank's rollouts; returns this rank's metrics."""
    batch = ro.batch.to(device)
    mask = batch.response_mask
    with timer("training"), torch.no_grad():
        old_logprobs, _ = policy_forward(policy, batch)
        ref_logprobs = reference_logprobs(reference, policy, batch)
        rewards, kl = core.kl_penalized_rewards(ro.scores.to(device), old_logprobs, ref_logprobs, mask,
                                                kl_ctl.beta)
        if critic is None:
            old_values = None
            advantages, answer_returns = core.rloo_advantages(rewards, ro.groups.to(device), mask)
            returns = answer_returns[:, None] * mask
        else:
            old_values = critic(batch)
            advantages, returns = core.gae(rewards, old_values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask)
        gap = core.masked_mean((ro.sampler_logprobs.to(device) - old_logprobs).abs(), mask)

    stats: dict[str, list[float]] = {}

    def note(**values):
        for k, v in values.items():
            stats.setdefault(k, []).append(float(v))

    generator = torch.Generator().manual_seed(iteration_seed(args.seed, iteration, 7919))
    policy_opt, value_opt = optimizers["policy"], optimizers.get("value")
    with timer("training"):
        for _ in range(args.ppo_epochs):
            for rows in minibatches(batch.input_ids.shape[0], args.minibatch_size, generator):
                mb = batch.select(rows.to(device))
                mb_mask = mb.response_mask
                policy_opt.zero_grad(set_to_none=True)
                ptx = torch.zeros((), device=device)
                if args.gamma_ptx > 0 and ptx_sampler is not None:
                    # Its own forward and backward first, gradients kept local (no_sync): DDP allows one
                    # synchronised forward per backward, and the next backward reduces the sum of both.
                    with policy.no_sync() if hasattr(policy, "no_sync") else contextlib.nullcontext():
                        ptx = ptx_loss(policy, ptx_sampler().to(device))
                        (args.gamma_ptx * ptx).backward()
                    ptx = ptx.detach()
                logprobs, entropy = policy_forward(policy, mb, with_entropy=True)
                pg = core.policy_loss(logprobs, old_logprobs[rows], advantages[rows], mb_mask, args.clip_range)
                pg.loss.backward()
                policy_grad = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                policy_opt.step()
                note(policy_loss=pg.loss.item(), clip_fraction=pg.clip_fraction.item(),
                     approx_kl=pg.approx_kl.item(), entropy=core.masked_mean(entropy.detach(), mb_mask).item(),
                     ptx_loss=ptx.item(), policy_grad_norm=float(policy_grad))

                if critic is not None:
                    values = critic(mb)
                    v_loss, v_clip = core.value_loss(values, old_values[rows], returns[rows], mb_mask,
                                                     args.clip_range_value)
                    value_opt.zero_grad(set_to_none=True)
                    (args.vf_coef * v_loss).backward()
                    torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                    value_opt.step()
                    note(value_loss=v_loss.item(), value_clip_fraction=v_clip.item())

    kl_per_answer = kl.sum(1)
    lengths = mask.sum(1)
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out |= {"reward": ro.scores.mean().item(), "reward_std": ro.scores.std().item() if len(ro.scores) > 1 else 0.0,
            "kl": kl_per_answer.mean().item(), "non_score_reward": (-kl_ctl.beta * kl_per_answer).mean().item(),
            "beta": kl_ctl.beta, "answer_tokens": lengths.mean().item(), "logprob_gap": gap.item(),
            "truncated_share": sum(f == "length" for f in ro.finish_reasons) / max(1, len(ro.finish_reasons)),
            "returns": core.masked_mean(returns, mask).item()}
    if old_values is not None:
        out["value_explained_variance"] = _explained_variance(old_values, returns, mask)
    return out


def _explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_returns = core.masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return (1 - core.masked_var(returns - values, mask) / var_returns).item()


# ---- the whole job ---------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """What a run trains: resolved models and prompt sets (pipelines/ppo/job.py resolves them)."""

    policy_dir: Path  # the policy PPO starts from
    reference_dir: Path  # π_ref of the KL penalty (InstructGPT: the SFT model)
    train_prompts: list[list[dict]]
    reward: object  # a pipelines.ppo.rewards.RewardSource
    value_init_dir: Path | None = None  # a saved RM to start the critic from (same tokenizer as the policy)
    demonstrations: list[list[dict]] = field(default_factory=list)  # PPO-ptx data


@dataclass
class Result:
    iterations_done: int
    resumed_from: int | None
    final_dir: Path
    history: list[dict]


def train(inputs: Inputs, args: Args, out: Path, *, resume: bool = True, engine_env: dict | None = None,
          on_iteration: Callable[[int, dict[str, float]], None] | None = None, stop_after: int | None = None,
          console=None) -> Result:
    """Runs `args.iterations` PPO iterations (continuing from the last checkpoint under `out` when `resume`),
    saves the final policy to out/final and returns the per-iteration metrics of this process's run.
    `stop_after` ends this invocation after that many iterations, leaving a checkpoint (a preemption)."""
    from rich.console import Console
    from transformers import AutoTokenizer

    from alignloop.console_progress import ProgressBar

    validate(args)
    if not inputs.train_prompts:
        raise ValueError("no training prompts: users have sent none yet and no prompt file was given")
    console = console or Console(stderr=True)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(args.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    d = init_distributed(device)
    random.seed(args.seed + d.rank)
    torch.manual_seed(args.seed + d.rank)
    dtype = getattr(torch, args.dtype)

    tokenizer = AutoTokenizer.from_pretrained(str(inputs.policy_dir))
    policy = load_policy(inputs.policy_dir, dtype).to(device).train()
    critic = None
    if args.advantage_estimator == "gae":
        critic = (ValueModel.from_reward_model(inputs.value_init_dir, dtype) if inputs.value_init_dir
                  else ValueModel.from_policy_folder(inputs.policy_dir, dtype)).to(device).train()
    # With LoRA, a run that starts from π_ref reads π_ref from its own network with the adapters off.
    reference = None
    if not (args.lora_rank and inputs.policy_dir.resolve() == inputs.reference_dir.resolve()):
        reference = load_policy(inputs.reference_dir, dtype).to(device).eval().requires_grad_(False)
    if args.lora_rank:
        adapters = {"rank": args.lora_rank, "alpha": args.lora_alpha, "target_modules": args.lora_target_modules}
        policy = lora.add_adapters(policy, **adapters)
        if critic is not None:
            critic.body = lora.add_adapters(critic.body, **adapters)  # the head stays wholly trainable
    for m in (policy, critic) if critic is not None else (policy,):  # as in TRL/OpenRLHF: the old and new log-probs must see the same network
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        policy = DDP(policy, device_ids=ids)
        critic = DDP(critic, device_ids=ids) if critic is not None else None
    optimizers = {
        "policy": torch.optim.AdamW(trainable(policy), lr=args.policy_lr, weight_decay=args.weight_decay)}
    if critic is not None:
        optimizers["value"] = torch.optim.AdamW(trainable(critic), lr=args.value_lr, weight_decay=args.weight_decay)
    kl_ctl = (core.AdaptiveKLController(args.beta, args.kl_target, args.kl_horizon) if args.kl_target
              else core.FixedKLController(args.beta))

    checkpoints = out / "checkpoints"
    start, resumed_from = 0, None
    latest = latest_checkpoint(checkpoints) if resume else None
    if latest is not None:
        state = load_checkpoint(latest, policy, critic, optimizers, kl_ctl)
        start = resumed_from = state["iteration"]
        if d.main:
            console.print(f"resuming after iteration {start} from {latest}")

    if args.rollout_engine == "vllm":
        from pipelines.ppo.rollout import VLLMRollout

        engine = VLLMRollout(inputs.policy_dir, max_model_len=args.max_model_len, seed=args.seed + d.rank,
                             dtype=args.dtype, env=engine_env,
                             gpu_memory_utilization=0.3 if device.type == "cuda" else 0.9)
        if resumed_from is not None:
            engine.load_weights(lora.merged_weights(_unwrap(policy)))
    else:
        from pipelines.ppo.rollout import HFRollout

        engine = HFRollout(_unwrap(policy), tokenizer)

    ptx_sampler = None
    if args.gamma_ptx > 0:
        if not inputs.demonstrations:
            raise ValueError("gamma_ptx > 0 needs demonstrations (a ptx file or users' corrections)")
        demos = [demonstration_ids(tokenizer, m) for m in inputs.demonstrations]
        ptx_rng = random.Random(args.seed + 17 + d.rank)

        def ptx_sampler() -> RolloutBatch:
            chosen = [demos[ptx_rng.randrange(len(demos))] for _ in range(args.ptx_batch_size)]
            return pack([p for p, _ in chosen], [a for _, a in chosen], pad_id(tokenizer))

    history: list[dict] = []
    try:
        with ProgressBar(console, "PPO", args.iterations, unit=" iterations", done=start,
                         disable=not d.main) as bar:
            for iteration in range(start + 1, args.iterations + 1):
                if stop_after is not None and iteration > start + stop_after:
                    break
                if args.anneal_lr:
                    frac = 1.0 - (iteration - 1) / args.iterations
                    optimizers["policy"].param_groups[0]["lr"] = frac * args.policy_lr
                    if "value" in optimizers:
                        optimizers["value"].param_groups[0]["lr"] = frac * args.value_lr
                # The same prompts for a resumed run: drawn from a generator seeded by (seed, iteration).
                prompt_rng = random.Random(iteration_seed(args.seed, iteration, 0))
                draw = [inputs.train_prompts[prompt_rng.randrange(len(inputs.train_prompts))]
                        for _ in range(args.prompts_per_iteration * d.world)]
                mine = draw[d.rank * args.prompts_per_iteration:(d.rank + 1) * args.prompts_per_iteration]
                timer = Timer()
                started = time.perf_counter()
                ro = collect(engine, inputs.reward, tokenizer, mine, args, iteration, d, timer)
                metrics = ppo_iteration(policy, reference, critic, optimizers, kl_ctl, ro, args, device,
                                        iteration, ptx_sampler=ptx_sampler, timer=timer)
                with timer("weight_sync"):
                    engine.load_weights(lora.merged_weights(_unwrap(policy)))
                answer_tokens = float(ro.batch.response_mask.sum())
                metrics |= {f"time_{k}_s": v for k, v in timer.seconds.items()}
                metrics["rollout_tokens_per_s"] = answer_tokens / max(timer.seconds.get("generation", 0), 1e-9)
                metrics["iteration_s"] = time.perf_counter() - started
                metrics = all_mean(metrics, d)
                # Every rank saw the same mean KL: beta moves identically everywhere.
                kl_ctl.update(metrics["kl"], args.prompts_per_iteration * args.samples_per_prompt * d.world)
                metrics["iteration"] = iteration
                history.append(metrics)
                if d.main:
                    if on_iteration:
                        on_iteration(iteration, metrics)
                    bar.update(iteration, f"reward {metrics['reward']:+.3f}  kl {metrics['kl']:.3f}  "
                                          f"beta {metrics['beta']:.4f}")
                    if args.checkpoint_every and iteration % args.checkpoint_every == 0:
                        save_checkpoint(checkpoints, iteration, policy, critic, optimizers, kl_ctl,
                                        {"args": asdict(args)})
                if d.world > 1:
                    dist.barrier()
        done = history[-1]["iteration"] if history else start
        final = out / "final"
        if d.main and done == args.iterations:
            if not args.checkpoint_every or done % args.checkpoint_every:
                save_checkpoint(checkpoints, done, policy, critic, optimizers, kl_ctl, {"args": asdict(args)})
            save_policy(lora.merged_model(_unwrap(policy)), tokenizer, final, inputs.policy_dir)
        if d.world > 1:
            dist.barrier()
        return Result(done, resumed_from, final, history)
    finally:
        engine.close()
