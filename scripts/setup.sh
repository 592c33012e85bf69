#!/usr/bin/env bash
# Create .venv and install the package (with extras named in $1, e.g. "test"), CPU build of torch first.
# Sourced by scripts/test.sh and scripts/serve.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m venv .venv
. .venv/bin/activate
pip_install() { python -m pip install -q --disable-pip-version-check "$@"; }
# torch first, pinned to the CPU build that lies on this workplace's disk, so the range in
# pyproject.toml is already satisfied and pip does not fetch a multi-GB CUDA build.
if [ -d /opt/wheels ]; then pip_install --find-links /opt/wheels "torch==2.13.0"; else pip_install "torch==2.13.0"; fi
pip_install -e ".${1:+[$1]}"
