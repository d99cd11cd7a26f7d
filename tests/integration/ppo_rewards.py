"""Known reward functions for PPO tests (`--reward fn:tests.integration.ppo_rewards:NAME`)."""


def letter_share(conversations, responses):
    """10 × the share of an answer's characters that are ASCII letters: a random tiny model scores ~7.5 and
    can learn to score more within a few dozen iterations."""
    return [10.0 * sum(c.isascii() and c.isalpha() for c in r) / max(1, len(r)) for r in responses]
