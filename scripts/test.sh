#!/usr/bin/env bash
# Set up, then run the whole test suite (unit tests on tiny models + integration tests on the embedded model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -ra "$@"
