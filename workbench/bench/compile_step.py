"""torch.compile of the training step (train.compile) against eager: tokens/s after warm-up, the time of
the first steps (where compilation happens) and the final validation perplexity, same recipe and data.

    python -m workbench.bench.compile_step               # kd_tiny (default corpus); appends to BENCHMARKS.md
    python -m workbench.bench.compile_step --steps 20 --no-record
"""

from __future__ import annotations

import argparse
import sys
import time

from workbench.bench import _report
from workbench.trainer import read_metrics


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="kd_tiny")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    every = 5
    common = [f"train.max_steps={args.steps}", f"train.log_every={every}", "train.eval_every=0",
              "train.checkpoint_every=0", "output.tensorboard=false", "eval.report=false", "output.overwrite=true"]
    rows = []
    for compiled in (False, True):
        out = _report.REPO / "outputs" / "bench_compile" / ("compiled" if compiled else "eager")
        m = _report.launch("single", args.recipe, *common, f"train.compile={str(compiled).lower()}", f"output.dir={out}")
        recs = [r for r in read_metrics(out) if "tokens_per_s" in r]
        first = recs[0]["tokens"] / recs[0]["tokens_per_s"]  # seconds of the first `every` steps
        steady = [r["tokens_per_s"] for r in recs[1:]]
        rows.append((compiled, first, sum(steady) / len(steady), m["student_val_ppl"], m["train_seconds"]))
    eager = rows[0][2]
    lines = [f"### torch.compile of the training step, {args.recipe} ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {_report.machine()}. `{args.recipe}`, {args.steps} steps, one process; tokens/s is the "
             f"mean of the logged windows after the first {every} steps, whose time holds the compilation.", "",
             "| step | first 5 steps s | tokens/s after | vs eager | validation ppl | train s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for compiled, first, tok, ppl, secs in rows:
        lines.append(f"| {'compiled' if compiled else 'eager'} | {first:.1f} | {tok:,.0f} | {tok / eager:.2f}x | "
                     f"{ppl:.3f} | {secs:.0f} |")
    _report.publish("\n".join(lines), record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
