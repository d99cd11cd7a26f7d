"""alignloop.vllm_plugin: vLLM's plugin loader finds it, and it drops only the rotary embedding's reload
warning."""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

import pytest

from alignloop import vllm_plugin


def record(layer: str, msg: str = vllm_plugin.FAILED_TO_LOAD) -> logging.LogRecord:
    return logging.LogRecord(vllm_plugin.RELOAD_LOGGER, logging.WARNING, "layerwise.py", 266, msg, (layer,),
                             None)


def test_vllm_finds_the_plugin_where_it_looks_for_general_plugins() -> None:
    found = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert found.get("alignloop") == "alignloop.vllm_plugin:register"


@pytest.mark.parametrize(("layer", "kept"), [
    ("RotaryEmbedding", False),
    ("Llama3RotaryEmbedding", False),  # vLLM's scaled variants hold a computed table too
    ("QKVParallelLinear", True),  # a layer with weights that really were not loaded
    ("VocabParallelEmbedding", True),
])
def test_only_weightless_layers_lose_the_warning(layer: str, kept: bool) -> None:
    assert vllm_plugin.WeightlessLayerReloadFilter().filter(record(layer)) is kept
    other = record("RotaryEmbedding", msg="%s: Delayed processing")
    assert vllm_plugin.WeightlessLayerReloadFilter().filter(other)


def test_register_installs_one_filter_however_often_it_runs(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger(vllm_plugin.RELOAD_LOGGER)
    before = list(logger.filters)
    try:
        vllm_plugin.register()
        vllm_plugin.register()
        assert sum(isinstance(f, vllm_plugin.WeightlessLayerReloadFilter) for f in logger.filters) == 1
        with caplog.at_level(logging.WARNING, logger=vllm_plugin.RELOAD_LOGGER):
            logger.warning(vllm_plugin.FAILED_TO_LOAD, "RotaryEmbedding")
            logger.warning(vllm_plugin.FAILED_TO_LOAD, "QKVParallelLinear")
        assert [r.getMessage() for r in caplog.records] == ["QKVParallelLinear: Failed to load weights"]
    finally:
        logger.filters[:] = before
