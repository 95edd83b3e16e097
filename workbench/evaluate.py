"""Compare finished runs: validation perplexity of each run's teacher and student.

    python workbench/evaluate.py outputs/kd_tiny outputs/sft_tiny

Runs are comparable only when they were evaluated on the same validation blocks (same corpus, tokenizer
and sequence length); the table says so, and refuses to rank runs that were not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the package, not our siblings
    sys.path[0] = str(Path(__file__).resolve().parent.parent)


def load_final(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "final_metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: has the run in {run_dir} finished?")
    return json.loads(path.read_text())


def compare(run_dirs: list[str | Path]) -> str:
    """A table of validation perplexities: each distinct teacher once, then every student."""
    runs = [(Path(d), load_final(d)) for d in run_dirs]
    keys = {m["data_key"] for _, m in runs}
    rows, teachers = [], {}
    for d, m in runs:
        if m.get("teacher_val_ppl") is not None:
            teachers.setdefault(m.get("teacher", "teacher"), (m["teacher_val_ppl"], m["data_key"]))
    for name, (ppl, _) in teachers.items():
        rows.append(("teacher", _short(name), ppl, None))
    for d, m in runs:
        rows.append(("student", f"{m['recipe']} ({d})", m["student_val_ppl"], m["step"]))
    width = max(len(r[1]) for r in rows)
    tokens = runs[0][1]["val_tokens"]
    lines = [f"validation perplexity on {tokens:,} held-out tokens (lower is better)",
             f"  {'role':8s} {'model':{width}s} {'steps':>6s} {'ppl':>10s}"]
    for role, name, ppl, step in rows:
        lines.append(f"  {role:8s} {name:{width}s} {'' if step is None else step:>6} {ppl:10.3f}")
    if len(keys) > 1:
        lines.append("WARNING: these runs used different validation data; their perplexities are not comparable")
    elif len(runs) == 2 and all(m.get("teacher_val_ppl") is None for _, m in runs[1:]):
        a, b = runs[0][1], runs[1][1]
        lines.append(f"  {a['recipe']} / {b['recipe']} perplexity ratio: {a['student_val_ppl'] / b['student_val_ppl']:.3f}")
    return "\n".join(lines)


def _short(path: str) -> str:
    parts = Path(path).parts
    return str(Path(*parts[-3:])) if len(parts) > 3 else path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        print(compare(argv))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
