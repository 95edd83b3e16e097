"""Bytes of gradient all-reduce per optimizer step with DDP compression hooks, and whether training still
converges: sft_tiny on 2 CPU processes (gloo), no hook vs fp16 vs PowerSGD (rank 1 and 4).

    python -m workbench.bench.comm_compression            # appends to BENCHMARKS.md
    python -m workbench.bench.comm_compression --steps 20 --no-record

torch's bf16 hook needs NCCL, so on CPU the 16-bit row is fp16 (the same byte count). Bytes per step are
what the hook sends, as logged by the trainer (parallel/comm_bytes_per_step), after PowerSGD's warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time

from workbench.bench import _report
from workbench.trainer import read_metrics

HOOKS = [("none", []), ("fp16", []), ("powersgd", ["parallel.powersgd_rank=1"]),
         ("powersgd", ["parallel.powersgd_rank=4"])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    common = [f"train.max_steps={args.steps}", "train.micro_batch_size=4", f"train.warmup_steps={args.steps // 10}",
              "train.log_every=5", "train.eval_every=0", "train.checkpoint_every=0", "output.tensorboard=false",
              "parallel.powersgd_warmup_steps=10"]
    rows = []
    for hook, extra in HOOKS:
        out = _report.REPO / "outputs" / "bench_comm" / "-".join([hook, *[e.split("=")[1] for e in extra]])
        m = _report.launch("cpu2_ddp", "sft_tiny", *common, f"parallel.comm_hook={hook}", *extra,
                           f"output.dir={out}", "output.overwrite=true", threads=1)
        recs = read_metrics(out)
        sent = [r["parallel/comm_bytes_per_step"] for r in recs if "parallel/comm_bytes_per_step" in r]
        losses = [r["train/loss"] for r in recs if "train/loss" in r]
        rows.append((hook, extra, sent[-1], losses[0], losses[-1], m["student_val_ppl"], m["train_seconds"]))
    full = rows[0][2]
    lines = [f"### DDP gradient compression, bytes per step ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {_report.machine()}. `sft_tiny` (1.26M trainable parameters) on 2 processes over gloo "
             f"(`cpu2_ddp.yaml`), {args.steps} steps x 2 x 4 x 256 tokens; PowerSGD after 10 uncompressed steps.", "",
             "| hook | bytes sent per step | vs none | first logged loss | last logged loss | validation ppl | train s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for hook, extra, sent, first, last, ppl, secs in rows:
        name = hook + (f" ({extra[0].split('.')[-1]})" if extra else "")
        lines.append(f"| {name} | {sent:,.0f} | {sent / full:.3f} | {first:.3f} | {last:.3f} | {ppl:.2f} | {secs:.0f} |")
    text = "\n".join(lines)
    _report.publish(text, record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
