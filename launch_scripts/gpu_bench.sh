#!/usr/bin/env bash
# The GPU-only measurements, run ON a CUDA machine from the repository root, offline:
#     bash launch_scripts/gpu_bench.sh [STEP ...]          # default: tests nf4 qlora
# Steps:  tests  the kernel tests on CUDA (bit-exact dequant vs bitsandbytes, GEMM/GEMV, autograd, LoRA)
#         nf4    kernels/bench/bench_nf4.py: every shape and M (ours vs cuBLAS bf16 vs bitsandbytes)
#         quick  bench_nf4 --quick (one shape, M in {1, 16, 512})
#         probe  kernels/bench/decode_probe.py: where the kernels' time goes (each code decode, dequant routes)
#         qlora  workbench/bench/qlora_memory.py --gpu: one QLoRA step's peak memory, bnb vs our kernels
#         loss   workbench/bench/kd_loss_memory.py --liger --gpu: the KD loss at Liger's setting, dense vs ours
#                vs liger_kernel's LigerFusedLinearJSD (issue 17)
#         spec   spec_train (trains pretrain_gpu_teacher, kd_gpu_draft, sft_gpu_draft) then spec_bench
#                (workbench/bench/speculative.py on the GPU, bf16 and fp32: teacher alone vs ours vs HF
#                assisted generation, distilled vs undistilled draft); either alone as two calls if one is
#                too long: the models stay in ~/.cache/workbench and /tmp/gpu_runs while the machine stays up
# Packages the machine lacks come from .whl/ when present (launch_scripts/gpu_wheels.sh fetches them on a
# machine with PyPI); with none there, the machine's own are used. One log (log.txt: every step's output),
# steps.txt (exit status and seconds per step), gpu.txt and the results (nf4_bench.md/json, qlora_memory.md)
# go to $OUT (default gpu_out/); fold the .md sections into BENCHMARKS.md afterwards.
# Environment knobs, for a lease shorter than the full run:
#   LIMIT_<step>=SECONDS        stop that step after so long (e.g. LIMIT_tests=120); the next step still runs
#   SPEC_TEACHER_STEPS=N SPEC_DRAFT_STEPS=N   spec_train scaled down: the teacher trained for N steps into
#                               /tmp/gpu_runs/teacher, the drafts distilled from it for N steps (default: the
#                               recipes' own 2000 / 1500 steps, the teacher cached as recipe:pretrain_gpu_teacher)
#   SPEC_DTYPES="bfloat16"      the dtypes spec_bench measures (default "bfloat16 float32")
#   SPEC_PROMPTS=N              held-out prompts spec_bench decodes (default 64)
#   SPEC_COMPILE=1              spec_bench also measures ours compiled (torch.compile + CUDA graphs over a
#                               static KV cache: WORKBENCH_CUDA_GRAPHS=1 python -m workbench.bench.speculative
#                               --compile; its 'same tokens' column in float32 checks the graphs' tokens)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
SITE=/tmp/workbench-site
if [ -d "$REPO/.whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$REPO"/.whl/*.whl || exit 1
fi
# workbench itself, installed (not run from the checkout: kernels/ installs as workbench.kernels)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$REPO" || exit 1
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
cd /tmp  # not the checkout, whose workbench/ lacks workbench.kernels
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers, bitsandbytes as b; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'bnb', b.__version__)" \
    | tee -a "$OUT/gpu.txt"

status=0
step() {  # step NAME COMMAND...: runs it (at most $LIMIT_NAME s), logs to $OUT/log.txt, reports status and seconds
    local name=$1 start=$SECONDS limit_var="LIMIT_$1"
    shift
    echo "== $name: $*" | tee -a "$OUT/log.txt"
    timeout --kill-after=10 "${!limit_var:-0}" "$@" 2>&1 | tee -a "$OUT/log.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
    [ "$rc" = 0 ] || status=1
    return "$rc"
}
RUNS=${GPU_RUNS:-/tmp/gpu_runs}  # spec_train's models; spec_bench reads them (a later call, same warm machine)
TEACHER=recipe:pretrain_gpu_teacher
DRAFT_ARGS=()
if [ -n "${SPEC_TEACHER_STEPS:-}" ]; then
    TEACHER=$RUNS/teacher/model
    DRAFT_ARGS=(teacher.recipe=null "teacher.name_or_path=$TEACHER" "train.max_steps=${SPEC_DRAFT_STEPS:-1500}")
fi
run_step() {
    case $1 in
        spec_train)
            if [ -n "${SPEC_TEACHER_STEPS:-}" ] && [ ! -f "$TEACHER/config.json" ]; then
                step spec_teacher python3 -m workbench.train recipe=pretrain_gpu_teacher output.dir=$RUNS/teacher \
                    train.max_steps=$SPEC_TEACHER_STEPS eval.report=false || return 1
            fi
            step spec_train bash -c "python3 -m workbench.train recipe=kd_gpu_draft output.dir=$RUNS/kd_gpu_draft \
                ${DRAFT_ARGS[*]} && python3 -m workbench.train recipe=sft_gpu_draft output.dir=$RUNS/sft_gpu_draft \
                ${DRAFT_ARGS[*]:2}" ;;
        spec_bench)
            for dtype in ${SPEC_DTYPES:-bfloat16 float32}; do
                step "spec_$dtype" python3 -m workbench.bench.speculative --teacher "$TEACHER" \
                    --drafts "$RUNS/kd_gpu_draft/model,$RUNS/sft_gpu_draft/model" \
                    --baseline "$RUNS/sft_gpu_draft/model" --dtype $dtype --prompts "${SPEC_PROMPTS:-64}" --no-record
                if [ -n "${SPEC_COMPILE:-}" ]; then
                    step "spec_${dtype}_compiled" env WORKBENCH_CUDA_GRAPHS=1 python3 -m workbench.bench.speculative --teacher "$TEACHER" \
                        --drafts "$RUNS/kd_gpu_draft/model,$RUNS/sft_gpu_draft/model" \
                        --baseline "$RUNS/sft_gpu_draft/model" --dtype $dtype --prompts "${SPEC_PROMPTS:-64}" \
                        --compile --no-record
                fi
            done ;;
        *) echo "unknown step '$1' (tests, nf4, quick, probe, qlora, loss, spec = spec_train + spec_bench)" >&2; exit 2 ;;
    esac
}
for s in "${@:-tests nf4 qlora}"; do
    for name in $s; do
        case $name in
            tests) step tests python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" "$REPO/tests/test_kernels.py" "$REPO/tests/test_memory.py" "$REPO/tests/test_losses.py" -k "kernel or nf4 or gpu" ;;
            nf4) step nf4 python3 -m workbench.kernels.bench.bench_nf4 --out "$OUT" ;;
            quick) step quick python3 -m workbench.kernels.bench.bench_nf4 --quick --out "$OUT" ;;
            probe) step probe python3 -m workbench.kernels.bench.decode_probe --out "$OUT" ;;
            qlora) step qlora python3 -m workbench.bench.qlora_memory --gpu --no-record --out "$OUT" ;;
            loss) step loss python3 -m workbench.bench.kd_loss_memory --liger --gpu --no-record ;;
            spec) run_step spec_train && run_step spec_bench ;;
            *) run_step "$name" ;;
        esac
    done
done
exit $status
