#!/usr/bin/env bash
# The test command: builds its own environment on a bare machine, lints, runs the suite.
#   ./tests/run.sh [pytest args]      e.g. ./tests/run.sh -m unit
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch==2.13.0 is the CPU build on these machines; the constraints pin the one combination
# of protobuf / grpc health+reflection that ray.serve and tritonclient share (see the file).
.venv/bin/pip install -q -c tests/constraints.txt torch==2.13.0 -e '.[test,hf]'

# A second, tiny environment proves the generated protos also load on protobuf 7.
python3 -m venv .venv-proto7
.venv-proto7/bin/pip install -q 'protobuf>=7' 'grpcio>=1.73'
export MOEFLEET_PROTO7_PYTHON="$PWD/.venv-proto7/bin/python"

.venv/bin/ruff check .
exec .venv/bin/pytest "$@"
