#!/usr/bin/env bash
# Fresh machine -> the CPU test suite. Creates .venv (unless a virtual environment is active),
# installs, runs pytest. GPU tests are skipped without a GPU. Extra arguments go to pytest.
# The report's browser test needs Chromium: installed here from Debian's packages when run as root,
# else that one test is skipped.
set -euo pipefail
source "$(dirname "$0")/env.sh"
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (for the report's browser test)"
    (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 &&
        apt-get install -y -q chromium >/dev/null 2>&1; }) || echo "could not install chromium: its test is skipped"
fi
python -m pytest -q "$@"
