"""The hyper-parameters of a PPO run, apart from the trainer so the CLI can read them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Args:
    """Every hyper-parameter of a PPO run (logged to MLflow as params)."""

    # rollouts
    iterations: int = 20
    prompts_per_iteration: int = 16  # per rank
    samples_per_prompt: int = 2
    max_new_tokens: int = 64
    temperature: float = 1.0  # PPO needs the sampler's distribution = the policy's: keep 1.0
    # reward: r_t = −beta · KL_t, plus the RM score on the last token
    beta: float = 0.05  # InstructGPT's KL coefficient (their best: 0.02); the start value when adaptive
    kl_target: float | None = None  # nats per answer: turns on Ziegler et al.'s adaptive controller
    kl_horizon: int = 10_000  # samples over which the controller may move beta by ±20%
    reward_clip: float | None = 10.0  # |RM score| cap: one wild score must not dominate a batch
    missing_eos_penalty: float | None = None  # subtracted from answers cut by max_new_tokens
    # advantages
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    # "gae": a critic and GAE (InstructGPT's PPO). "rloo": no critic; an answer's advantage is its return (RM
    # score − beta·KL) minus the mean return of the other answers to its prompt (Ahmadian et al. 2024). Needs
    # samples_per_prompt >= 2; skips the critic's forward and backward passes.
    advantage_estimator: str = "gae"
    # optimisation
    ppo_epochs: int = 4
    minibatch_size: int = 8  # answers per optimiser step (per rank)
    clip_range: float = 0.2
    clip_range_value: float | None = 0.2
    vf_coef: float = 0.5  # weight of the value loss (the critic has its own optimiser; this scales its lr)
    policy_lr: float = 1e-6
    value_lr: float = 1e-5
    anneal_lr: bool = False  # linear decay to 0 over `iterations` (CleanRL's default is on; RLHF runs are short)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # PPO-ptx: gamma_ptx × LM loss on demonstrations, mixed into every minibatch
    gamma_ptx: float = 0.0
    ptx_batch_size: int = 4
    # LoRA (peft): train low-rank adapters instead of every weight (bigger policies); 0 = full fine-tuning
    lora_rank: int = 0
    lora_alpha: float = 16.0  # adapters scale by lora_alpha / lora_rank
    lora_target_modules: str = "all-linear"  # or comma-separated module names, e.g. "q_proj,v_proj"
    # engineering
    seed: int = 0
    rollout_engine: str = "vllm"  # "vllm" | "hf" (transformers generate, the benchmark's baseline)
    max_model_len: int = 1024
    checkpoint_every: int = 1  # iterations; 0: only at the end
    device: str = "auto"
    dtype: str = "float32"


def validate(args: Args) -> None:
    """Refuses a configuration that cannot mean what was asked, naming the field."""
    checks = [
        (args.beta >= 0, "beta must be >= 0"),
        (args.kl_target is None or args.kl_target > 0, "kl_target must be > 0"),
        (args.iterations >= 1, "iterations must be >= 1"),
        (args.prompts_per_iteration >= 1, "prompts_per_iteration must be >= 1"),
        (args.samples_per_prompt >= 1, "samples_per_prompt must be >= 1"),
        (args.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
        (args.temperature > 0, "temperature must be > 0"),
        (0 < args.clip_range < 1, "clip_range must be in (0, 1)"),
        (args.clip_range_value is None or args.clip_range_value > 0, "clip_range_value must be > 0"),
        (0 <= args.gamma <= 1 and 0 <= args.lam <= 1, "gamma and lam must be in [0, 1]"),
        (args.ppo_epochs >= 1 and args.minibatch_size >= 1, "ppo_epochs and minibatch_size must be >= 1"),
        (args.policy_lr > 0 and args.value_lr > 0, "policy_lr and value_lr must be > 0"),
        (args.gamma_ptx >= 0, "gamma_ptx must be >= 0"),
        (args.rollout_engine in ("vllm", "hf"), "rollout_engine must be vllm or hf"),
        (args.lora_rank >= 0, "lora_rank must be >= 0 (0: no LoRA)"),
        (args.lora_alpha > 0, "lora_alpha must be > 0"),
        (args.advantage_estimator in ("gae", "rloo"), "advantage_estimator must be gae or rloo"),
        (args.advantage_estimator != "rloo" or args.samples_per_prompt >= 2,
         "advantage_estimator rloo needs samples_per_prompt >= 2 (a baseline from the other answers)"),
        (bool(args.lora_target_modules.strip(" ,")), "lora_target_modules must name modules or be all-linear"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
