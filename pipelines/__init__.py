"""alignloop pipelines: one-off and batch jobs (model bootstrap, reward-model training, PPO)."""
