"""Validation perplexity per distillation loss at an equal step budget, against the no-distillation
baseline: every kd_tiny variant and sft_tiny trained on the embedded default, one table.

    python -m workbench.bench.kd_losses                        # trains what is missing, appends to BENCHMARKS.md
    python -m workbench.bench.kd_losses --recipes kd_tiny sft_tiny --no-record

Each recipe runs as `accelerate launch workbench/train.py recipe=NAME resume=true` (a finished run in
outputs/NAME is reused, an interrupted one continues); the table reads their final_metrics.json.
"""

from __future__ import annotations

import argparse
import sys
import time

from workbench.bench import _report

RECIPES = ["sft_tiny", "kd_tiny", "kd_tiny_rkl", "kd_tiny_jsd", "kd_tiny_hidden_attn", "kd_tiny_topk",
           "kd_tiny_gkd", "minillm_tiny"]


def train(name: str) -> dict:
    return _report.launch("single", name, "resume=true")


def table(results: dict[str, dict]) -> str:
    from workbench.config import load_recipe

    base = results["sft_tiny"]["student_val_ppl"] if "sft_tiny" in results else None
    teacher = next((m["teacher_val_ppl"] for m in results.values() if m.get("teacher_val_ppl")), None)
    lines = ["| recipe | objective | steps | validation perplexity | vs sft_tiny | train s (this run) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, m in results.items():
        r = load_recipe(name)
        terms = " + ".join(f"{t.weight:g} {t.name}" for t in r.distill.losses)
        if r.distill.onpolicy.method != "off":
            terms += f" ({r.distill.onpolicy.method})"
        if r.distill.teacher_cache.top_k:
            terms += f" (top-{r.distill.teacher_cache.top_k} cache)"
        ratio = f"{m['student_val_ppl'] / base:.3f}" if base else "-"
        lines.append(f"| `{name}` | {terms} | {m['step']} | {m['student_val_ppl']:.2f} | {ratio} | "
                     f"{m['train_seconds']:.0f} |")
    if teacher:
        lines.append(f"| teacher (`pretrain_tiny_teacher`) | cross_entropy | | {teacher:.2f} | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    results = {name: train(name) for name in args.recipes}
    keys = {m["data_key"] for m in results.values()}
    text = "\n".join([
        f"### Validation perplexity per distillation loss ({time.strftime('%Y-%m-%d')})", "",
        f"Machine: {_report.machine()}. Every recipe: the 1.3M-parameter student, 300 steps x 2,048 tokens, "
        "the same data order; perplexity on the held-out standard-library files"
        + ("" if len(keys) == 1 else " (WARNING: the runs used different validation data)") + ".", "",
        table(results)])
    _report.publish(text, record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
