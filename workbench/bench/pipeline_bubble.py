"""GPipe on CPU processes: step time and the measured bubble (the share of a step each stage waits) for
N = 2 stages and M micro-batches, against the GPipe paper's (N - 1) / (M + N - 1) and one process.

    python -m workbench.bench.pipeline_bubble            # appends to BENCHMARKS.md
    python -m workbench.bench.pipeline_bubble --steps 10 --no-record

`sft_tiny` with a 6-block student (llama-teacher-5m, 3 blocks per stage), micro-batch 8 x 256 tokens
per step, one thread per process (`cpu2_pipeline.yaml`); the reference is one process with one thread
on the same batches. A stage's busy time is what it spends in the schedule's forward and backward calls
(the loss included on the last stage); the bubble is 1 - the mean busy share, so it also holds the
sends and any imbalance between the stages (the last one also runs the 4,096-token output layer).
"""

from __future__ import annotations

import argparse
import sys
import time

from workbench.bench import _report
from workbench.trainer import read_metrics


def _steady(out, key: str) -> list:
    """A metric's values after the first logged record (warm-up)."""
    vals = [r[key] for r in read_metrics(out) if key in r]
    return vals[1:] or vals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--microbatches", default="1,2,4,8")
    ap.add_argument("--student", default="llama-teacher-5m", help="a tiny config (workbench.models.TINY_CONFIGS)")
    ap.add_argument("--blocks", default=None, help="blocks per stage, e.g. 4,2 (default: even)")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    common = [f"train.max_steps={args.steps}", "train.micro_batch_size=8", "train.warmup_steps=2", "train.log_every=5",
              "train.eval_every=0", "train.checkpoint_every=0", "output.tensorboard=false", "eval.report=false",
              f"student.tiny={args.student}", "output.overwrite=true"]
    root = _report.REPO / "outputs" / "bench_pipeline"
    _report.launch("single", "sft_tiny", *common, f"output.dir={root / 'single'}", threads=1)
    one = sum(_steady(root / "single", "tokens_per_s")) / len(_steady(root / "single", "tokens_per_s"))
    rows = []
    for M in [int(m) for m in args.microbatches.split(",")]:
        out = root / f"m{M}"
        split = [f"parallel.pipeline_blocks=[{args.blocks}]"] if args.blocks else []
        _report.launch("cpu2_pipeline", "sft_tiny", *common, "parallel.pipeline_stages=2", *split,
                       f"parallel.pipeline_microbatches={M}", f"output.dir={out}", threads=1)
        tok = _steady(out, "tokens_per_s")
        step = _steady(out, "parallel/step_seconds")
        bubble = _steady(out, "parallel/bubble_fraction")
        busy = _steady(out, "parallel/stage_busy_fraction")
        rows.append((M, sum(step) / len(step), sum(tok) / len(tok), sum(bubble) / len(bubble),
                     [sum(b[i] for b in busy) / len(busy) for i in range(2)], 1 / (M + 1)))
    from workbench.models import TINY_CONFIGS

    blocks = TINY_CONFIGS[args.student]["num_hidden_layers"]
    per_stage = args.blocks.split(",") if args.blocks else [str((blocks + 1) // 2), str(blocks // 2)]
    lines = [f"### GPipe pipeline bubble, 2 stages on CPU processes ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {_report.machine()}. `sft_tiny`, student `{args.student}` ({blocks} blocks, "
             f"{' and '.join(per_stage)} per stage), "
             f"8 x 256 tokens per step, {args.steps} steps (means over the logged windows after the first), "
             "torch.distributed.pipelining ScheduleGPipe over gloo, one thread per process "
             f"(`cpu2_pipeline.yaml`). One process, one thread, same batches: {one:,.0f} tokens/s.", "",
             "| micro-batches M | step s | tokens/s | vs one process | stage busy (0, 1) | measured bubble | "
             "GPipe (N-1)/(M+N-1) |", "| ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for M, step, tok, bubble, busy, bound in rows:
        lines.append(f"| {M} | {step:.3f} | {tok:,.0f} | {tok / one:.2f}x | {busy[0]:.2f}, {busy[1]:.2f} | "
                     f"{bubble:.2f} | {bound:.2f} |")
    text = "\n".join(lines)
    _report.publish(text, record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
