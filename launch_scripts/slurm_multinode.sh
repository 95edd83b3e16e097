#!/usr/bin/env bash
# Multi-node training under SLURM: one accelerate launcher per node, torch rendezvous on the first node.
#   sbatch --nodes=2 launch_scripts/slurm_multinode.sh recipe=kd_13b_to_7b [key=value ...]
#   CONFIG=launch_scripts/accelerate/zero3_offload.yaml sbatch launch_scripts/slurm_multinode.sh recipe=...
# SLURM sends SIGTERM 5 minutes before the time limit: training finishes its step, writes a checkpoint and
# exits; with --requeue the job comes back and resume=true continues from that checkpoint.
#SBATCH --job-name=workbench
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
CONFIG=${CONFIG:-launch_scripts/accelerate/zero3.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NODES=${SLURM_NNODES:-1}
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
srun --kill-on-bad-exit=1 bash -c "accelerate launch --config_file $CONFIG \
    --num_machines $NODES --num_processes $((NODES * GPUS_PER_NODE)) --machine_rank \$SLURM_NODEID \
    --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT --rdzv_backend c10d \
    workbench/train.py resume=true $*"
