"""What every benchmark prints with its numbers: the machine and library versions, and the append to
BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from workbench.evaluation import machine  # noqa: F401  (re-exported for the benchmarks)

REPO = Path(__file__).resolve().parents[2]


def append_to_benchmarks(text: str) -> Path:
    path = REPO / "BENCHMARKS.md"
    with path.open("a") as f:
        f.write("\n" + text.rstrip("\n") + "\n")
    return path


def publish(text: str, record: bool) -> None:
    """Print a benchmark's section and, when `record`, append it to BENCHMARKS.md."""
    print(text)
    if record:
        print(f"appended to {append_to_benchmarks(text)}")


def run_and_publish(run, args) -> int:
    """A benchmark's main after its arguments: publish `run(args)` (record unless args.no_record) -> 0; a
    model or recipe that is not there ends in one `error:` line -> 2."""
    from workbench.config import RecipeError

    try:
        publish(run(args), record=not args.no_record)
        return 0
    except (RecipeError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def launch(config: str, recipe: str, *overrides: str, threads: int | None = None) -> dict:
    """`accelerate launch --config_file launch_scripts/accelerate/<config>.yaml workbench/train.py
    recipe=<recipe> [overrides]` from the repository root; -> the run's final_metrics.json."""
    from workbench.config import load_recipe

    out = load_recipe(recipe, list(overrides)).output_dir
    out = out if out.is_absolute() else REPO / out
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or os.cpu_count())}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           f"launch_scripts/accelerate/{config}.yaml", "workbench/train.py", f"recipe={recipe}", *overrides]
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return json.loads((out / "final_metrics.json").read_text())
