#!/usr/bin/env bash
# Install workbench into the active Python environment: torch first (so pip does not pull another
# build), then the project with torch pinned to what is installed. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip"
TORCH=${WORKBENCH_TORCH:-torch==2.13.0}
if ! python -c "import torch" 2>/dev/null; then
    $PIP install -q "$TORCH"
fi
constraints=$(mktemp)
python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
$PIP install -q -c "$constraints" -c launch_scripts/constraints.txt -e ".[dev,quant,deepspeed,eval,trl]"
rm -f "$constraints"
