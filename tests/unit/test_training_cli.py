"""`alignloop ppo train` as a command: what it checks before any model is loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(("flag", "value", "message"), [("--beta", "-0.1", "beta must be >= 0"),
                                                         ("--clip-range", "1.5", "clip_range must be in (0, 1)")])
def test_a_bad_configuration_is_refused_before_torch_is_even_imported(tmp_path, flag, value, message):
    """`alignloop ppo train` checks its hyper-parameters first: a typo costs a second, not a model load."""
    code = ("import sys\nfrom alignloop import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'torch' in sys.modules)")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ALIGNLOOP_")},
           "ALIGNLOOP_HOME": str(tmp_path), "ALIGNLOOP_CONFIG": str(tmp_path / "none.toml")}
    done = subprocess.run([sys.executable, "-c", code, "ppo", "train", "--policy", str(tmp_path), "--reference",
                           str(tmp_path), "--reward", "fn:no.such:reward", "--no-register", flag, value],
                          capture_output=True, text=True, env=env, timeout=120, cwd=Path(__file__).parents[2])
    assert done.stdout.split() == ["exit", "2", "False"], done.stdout + done.stderr
    assert message in done.stderr
