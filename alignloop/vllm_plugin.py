"""A vLLM general plugin (entry point `vllm.general_plugins` in pyproject.toml): vLLM runs `register` in each
of its processes, the engine core and its workers included, whatever way they were started (fork or spawn).

It drops one warning that vLLM 0.32 logs on every in-place weight reload (a champion swap in the policy
service, the policy gate's second policy): "RotaryEmbedding: Failed to load weights". The rotary embedding
holds only its cos/sin table, computed from the config and never saved in a checkpoint, so no reload can find
weights for it, and putting the old table back is right. tests/integration/test_ppo.py checks that the
reloaded engine answers as a freshly built one does, token for token. Logged at every swap, the warning would
teach operators to ignore the same words from a layer that really lost its weights; those still get through.
"""

from __future__ import annotations

import logging

RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
FAILED_TO_LOAD = "%s: Failed to load weights"


class WeightlessLayerReloadFilter(logging.Filter):
    """Drops the reload's "Failed to load weights" for layers that have no weights to load."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != FAILED_TO_LOAD or not record.args:
            return True
        layer = record.args[0] if isinstance(record.args, tuple) else None
        return not str(layer).endswith("RotaryEmbedding")


def register() -> None:
    """Installs the filter once per process (vLLM may call this more than once)."""
    logger = logging.getLogger(RELOAD_LOGGER)
    if not any(isinstance(f, WeightlessLayerReloadFilter) for f in logger.filters):
        logger.addFilter(WeightlessLayerReloadFilter())
