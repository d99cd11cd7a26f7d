"""A restarted policy engine reuses the kernels its first start compiled (the vLLM environment of
alignloop.config)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pipelines.models_init import build_tiny_policy
from tests.conftest import REPO

# Two starts of the engine the policy service builds, compiled (not eager), one after the other in one
# process and on one ALIGNLOOP_HOME: the files in its cache after the first, those the second wrote, and the
# answers.
TWO_STARTS = r"""
import asyncio, json, sys
from pathlib import Path
from alignloop.config import Settings
from services.policy.engine import build_engine

settings = Settings(home=Path(sys.argv[1]), enforce_eager=False, dtype="float32", max_model_len=256)
cache = settings.cache_dir


def files() -> dict[str, int]:  # what a start leaves for the next one (not sockets, not scratch), and when
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*")
            if p.is_file() and p.relative_to(cache).parts[0] not in ("rpc", "tmp")}


async def start_and_answer() -> str:
    engine = build_engine(settings, Path(sys.argv[2]), "p")
    from vllm import SamplingParams  # after build_engine, as in the policy service: importing vLLM pins
    # torch's compile cache to the default folder unless build_engine has named one
    try:
        params = SamplingParams(max_tokens=4, temperature=0)
        async for out in engine.generate("Hello", params, request_id="r"):
            text = out.outputs[0].text
        return text
    finally:
        engine.shutdown()


answers, seen = [], []
for _ in range(2):
    answers.append(asyncio.run(start_and_answer()))
    seen.append(files())
print(json.dumps({"answers": answers, "after_first": sorted(seen[0]),
                  "written_by_second": sorted(f for f, t in seen[1].items() if seen[0].get(f) != t)}))
"""


def test_a_second_start_runs_what_the_first_compiled(tmp_path):
    model = build_tiny_policy(tmp_path / "tiny", max_position_embeddings=512)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIGNLOOP_", "VLLM_", "TORCHINDUCTOR_"))}
    out = subprocess.run([sys.executable, "-c", TWO_STARTS, str(tmp_path / "home"), str(model)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=480)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # The first start compiled the model's kernels into the cache ...
    assert any(f.endswith(".so") for f in result["after_first"]), result["after_first"]
    # ... and the second wrote nothing there: it ran what the first compiled. (With vLLM's AOT compile cache,
    # which a start cannot read back on CPU, it compiled again and rewrote the cache.)
    assert result["written_by_second"] == []
    assert "Compiling model again" not in out.stderr
    # Each engine's processes exited in the time its shutdown gives them (alignloop.vllm_plugin), not killed.
    assert "force killing" not in out.stderr
    assert result["answers"][0] == result["answers"][1] and result["answers"][0]
