#!/usr/bin/env bash
# Set up .venv (CPU build of torch, the package, test dependencies) and run lint and the tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k tokenizer`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip_install() { python -m pip install -q --disable-pip-version-check "$@"; }
# torch first, pinned to the CPU build that lies on this workplace's disk, so the range in
# pyproject.toml is already satisfied and pip does not fetch a multi-GB CUDA build.
if [ -d /opt/wheels ]; then pip_install --find-links /opt/wheels "torch==2.13.0"; else pip_install "torch==2.13.0"; fi
pip_install -e ".[test]"
ruff check .
ruff format --check .
python -m pytest -q "$@"
