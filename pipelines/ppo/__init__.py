"""PPO (InstructGPT step 3): `core` holds the arithmetic, `models` the policy/reference/critic forward passes,
`rollout` the in-process vLLM sampler, `rewards` where scores come from, `prompts` the prompt sets, `train`
the loop (CleanRL-style, torchrun data-parallel), `job` the MLflow run and registration around it."""
