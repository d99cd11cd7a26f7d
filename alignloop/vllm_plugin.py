"""A vLLM general plugin (entry point `vllm.general_plugins` in pyproject.toml): vLLM runs `register` in each
of its processes, the engine core and its workers included, whatever way they were started (fork or spawn).

It drops one warning that vLLM 0.32 logs on every in-place weight reload (a champion swap in the policy
service, the policy gate's second policy): "RotaryEmbedding: Failed to load weights". The rotary embedding
holds only its cos/sin table, computed from the config and never saved in a checkpoint, so no reload can find
weights for it, and putting the old table back is right. tests/integration/test_ppo.py checks that the
reloaded engine answers as a freshly built one does, token for token. Logged at every swap, the warning would
teach operators to ignore the same words from a layer that really lost its weights; those still get through.

It also lets vLLM's own processes exit in time. An engine's shutdown gives its worker 5 s to exit
(VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS) and its engine core 5 s in all; a worker spent them in the garbage
collections the interpreter runs as it tears its modules down (~770k objects of torch and vLLM, 0.6 s a pass),
so every shutdown took 5 s and ended with the engine core SIGKILLed. Those processes are exiting and own no
cycle whose collection matters, so their objects are frozen out of the collector once atexit handlers run.
"""

from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing

RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
FAILED_TO_LOAD = "%s: Failed to load weights"


class WeightlessLayerReloadFilter(logging.Filter):
    """Drops the reload's "Failed to load weights" for layers that have no weights to load."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != FAILED_TO_LOAD or not record.args:
            return True
        layer = record.args[0] if isinstance(record.args, tuple) else None
        return not str(layer).endswith("RotaryEmbedding")


def skip_collections_at_exit() -> None:
    """Leaves every live object out of the collections the interpreter's teardown would run."""
    gc.disable()
    gc.freeze()


def register() -> None:
    """Installs the filter, and in vLLM's own processes the fast exit, once per process (vLLM may call this
    more than once)."""
    logger = logging.getLogger(RELOAD_LOGGER)
    if any(isinstance(f, WeightlessLayerReloadFilter) for f in logger.filters):
        return
    logger.addFilter(WeightlessLayerReloadFilter())
    # Registered now, it runs after the atexit handlers registered later (vLLM's, torch's), which may still
    # lean on the collector; multiprocessing's own cleanup runs after it and frees by reference count.
    if multiprocessing.parent_process() is not None:  # the engine core and its workers, not the service
        atexit.register(skip_collections_at_exit)
