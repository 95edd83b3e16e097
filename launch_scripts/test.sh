#!/usr/bin/env bash
# Fresh machine -> the CPU test suite. Creates .venv (unless a virtual environment is active),
# installs, runs pytest. GPU tests are skipped without a GPU. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
python -m pytest -q "$@"
