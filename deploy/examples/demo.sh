#!/usr/bin/env bash
# The demo command: builds its own environment, then runs deploy/examples/demo.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0 -e .
exec .venv/bin/python deploy/examples/demo.py "$@"
