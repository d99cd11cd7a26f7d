"""alignloop.vllm_plugin: vLLM's plugin loader finds it, it drops only the rotary embedding's reload
warning, and vLLM's own processes exit without the teardown's garbage collections."""

from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing
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


def registered_then_exited(conn) -> None:  # in a spawned process, as vLLM starts its engine core and workers
    vllm_plugin.register()
    atexit._run_exitfuncs()  # what the interpreter runs first on its way out
    conn.send({"collector_enabled": gc.isenabled(), "frozen": gc.get_freeze_count()})


def test_vllms_processes_leave_their_objects_out_of_the_collections_at_exit() -> None:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=registered_then_exited, args=(child,))
    proc.start()
    assert parent.poll(60), "the child did not report"
    state = parent.recv()
    proc.join(30)
    assert state["collector_enabled"] is False and state["frozen"] > 10_000
    assert proc.exitcode == 0


def test_the_service_process_keeps_its_collector_at_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    registered = []
    monkeypatch.setattr(vllm_plugin.atexit, "register", registered.append)
    logger = logging.getLogger(vllm_plugin.RELOAD_LOGGER)
    before = list(logger.filters)
    try:
        logger.filters[:] = [f for f in before if not isinstance(f, vllm_plugin.WeightlessLayerReloadFilter)]
        vllm_plugin.register()
        assert registered == []  # not vLLM's child: the policy service, a benchmark, this test
    finally:
        logger.filters[:] = before
