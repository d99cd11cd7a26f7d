"""Reward-model training (InstructGPT §3.5): `datasets` reads preference data, `train` fits the RM and
`publish` logs it to MLflow, gates it against the champion and registers it. The model itself is
`alignloop.reward_model`, shared with the reward service."""
