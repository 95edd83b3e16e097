"""Evaluate finished runs and write a report: the first run is the main one, the others its baselines.

    python workbench/evaluate.py outputs/kd_tiny outputs/sft_tiny            # report in outputs/kd_tiny
    python workbench/evaluate.py outputs/kd_tiny --out reports/kd --no-speculative --prompts 32

Prints the validation perplexities, then writes report.md, report.html (self-contained, with plots) and
report.json: perplexity, parameters and sizes, training throughput and peak memory, ROUGE-L and
multiple-choice accuracy, generation samples, speculative decoding with each student as the draft of the
main run's teacher. Settings default to the main run's recipe (`eval.*`). Training runs this itself at
the end of every run (eval.report=true).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the package, not our siblings
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from workbench.config import interruptible  # noqa: E402


@interruptible
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("runs", nargs="+", help="run directories (outputs/<recipe>)")
    ap.add_argument("--out", help="report directory (default: the first run's)")
    ap.add_argument("--prompts", type=int, help="held-out prompts (eval.prompts)")
    ap.add_argument("--max-new-tokens", type=int, help="tokens per generation (eval.max_new_tokens)")
    ap.add_argument("--choice-items", type=int, help="multiple-choice items (eval.choice_items)")
    ap.add_argument("--task-file", help="a .jsonl multiple-choice task (eval.task_file)")
    ap.add_argument("--no-speculative", action="store_true", help="skip the speculative decoding measurement")
    ap.add_argument("--table-only", action="store_true", help="print the perplexity table, write no report")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from workbench import third_party_warnings_once

    third_party_warnings_once()

    from workbench.config import RecipeError, WorkbenchError, build
    from workbench.evaluation import load_run, perplexity_table, report

    try:
        out = Path(args.out or args.runs[0]).expanduser()
        if out.exists() and not out.is_dir():  # found now, not after the whole evaluation
            raise FileExistsError(f"--out {out}: exists and is not a directory")
        seen = {}
        for d in args.runs:  # the same run twice: evaluated twice under two names, as if it were a baseline
            if Path(d).resolve() in seen:
                raise ValueError(f"{d}: the same run as {seen[Path(d).resolve()]}; give each run once")
            seen[Path(d).resolve()] = d
        runs = [load_run(d) for d in args.runs]
        print(perplexity_table(runs))
        if args.table_only:
            return 0
        cfg = runs[0].recipe.eval
        changes = {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "choice_items": args.choice_items,
                   "task_file": args.task_file, "speculative": False if args.no_speculative else None}
        try:
            cfg = build(type(cfg), {**dataclasses.asdict(cfg), **{k: v for k, v in changes.items() if v is not None}})
        except RecipeError as e:  # named as given: the flag, or the key of the run's recipe
            key = str(e).split(":", 1)[0]
            flag = f"--{key.replace('_', '-')}" if changes.get(key) is not None else f"eval.{key} (in {args.runs[0]})"
            raise RecipeError(f"{flag}:{str(e).split(':', 1)[1]}") from None
        if cfg.task_file and not Path(cfg.task_file).is_file():
            where = "--task-file" if args.task_file else f"eval.task_file (in {args.runs[0]})"
            raise FileNotFoundError(f"{where} {cfg.task_file}: " + ("a directory, not a .jsonl file"
                                                                     if Path(cfg.task_file).is_dir() else "no such file"))
        md, html = report(args.runs, args.out, cfg)
    except (OSError, ValueError, WorkbenchError) as e:  # (a report directory it cannot write, a full disk)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:
        from workbench.config import out_of_memory

        if out_of_memory(e) is None:
            raise
        print(f"error: {out_of_memory(e)}: lower --prompts or --max-new-tokens", file=sys.stderr)
        return 2
    print(f"report: {md}\n        {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
