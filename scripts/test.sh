#!/usr/bin/env bash
# Set up .venv (CPU build of torch, the package, test dependencies) and run lint and the tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k tokenizer`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh test
ruff check .
ruff format --check .
python -m pytest -q "$@"
