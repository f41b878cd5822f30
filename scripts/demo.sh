#!/usr/bin/env bash
# Set up, then stream 20,000 tokens (2.4x SmolLM2's trained context) through the sink cache, showing memory stay flat.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/streamkv demo "$@"
