#!/usr/bin/env bash
# Fresh machine -> the embedded default end to end, on CPU (about 15 minutes on 2 cores the first time):
# pre-train the tiny teacher (cached under ~/.cache/workbench), distil the student (kd_tiny), train the
# no-distillation baseline (sft_tiny), and print the validation perplexity of all three.
# Re-running reuses finished runs; an interrupted run continues where it stopped.
set -euo pipefail
source "$(dirname "$0")/env.sh"
# accelerate launch pins one OpenMP thread per process unless told otherwise; use every core.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
launch="accelerate launch --config_file launch_scripts/accelerate/single.yaml"
$launch workbench/train.py recipe=kd_tiny resume=true "$@"
$launch workbench/train.py recipe=sft_tiny resume=true "$@"
python workbench/evaluate.py outputs/kd_tiny outputs/sft_tiny
