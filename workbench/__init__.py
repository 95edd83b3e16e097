"""workbench: distil large language models into small students, LoRA/QLoRA over NF4 bases, and
speculative decoding with the distilled student as draft. See README.md and ../shared/DESIGN.md."""

import logging
import os
import sys
from pathlib import Path

__version__ = "0.1.0"

_CHECKOUT = Path(__file__).resolve().parent.parent  # the repository root, when running from a checkout


def _resolved(entry: str) -> Path | None:
    try:
        return Path(entry or ".").resolve()
    except (OSError, RuntimeError):
        return None


# The checkout's kernels/ installs as workbench.kernels. With the repository root on sys.path (`python -m`
# from there puts the working directory on it, `python workbench/train.py` the root) it is also found as a
# top-level `kernels` package, shadowing Hugging Face's `kernels` library, which bitsandbytes and
# transformers import. workbench is imported by now (its submodules come from workbench.__path__), and the
# root holds nothing else to import, so it leaves sys.path.
if (_CHECKOUT / "kernels" / "__init__.py").is_file() and (_CHECKOUT / "workbench" / "__init__.py").is_file():
    sys.path[:] = [p for p in sys.path if _resolved(p) != _CHECKOUT]

# bitsandbytes' CPU backend tries, at import, to fetch an optional kernel from the Hub and logs a
# warning asking to `pip install kernels` when it cannot; it falls back to its own code, so say nothing.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# Tied input/output embeddings are stored once in checkpoints, as they should be; accelerate warns
# about it at every save.
logging.getLogger("accelerate.utils.other").addFilter(lambda r: "Removed shared tensor" not in r.getMessage())


_PACKAGE = Path(__file__).resolve().parent


def launch_rank() -> int:
    """This process's rank in a launch (the launcher's RANK; 0 outside one)."""
    return int(os.environ.get("RANK", "0") or 0)


def third_party_warnings_once() -> None:
    """For the command-line tools: show a warning raised outside workbench (a library's deprecation, say)
    once per run, on the first process only; workbench's own warnings always show. Python's own "once per
    location" does not hold: every `warnings.catch_warnings()` block a library runs (DeepSpeed's
    collectives do, thousands of times a run) resets what was shown, so one deprecation floods the console."""
    import warnings

    show = warnings.showwarning
    if getattr(show, "_workbench_once", False):
        return
    seen: set[tuple] = set()
    first_process = launch_rank() == 0

    def once(message, category, filename, lineno, file=None, line=None):
        try:
            ours = Path(filename).resolve().is_relative_to(_PACKAGE)
        except (OSError, ValueError):
            ours = False
        if not ours:
            key = (category, str(message))
            if key in seen or not first_process:
                return
            seen.add(key)
        show(message, category, filename, lineno, file, line)

    once._workbench_once = True
    warnings.showwarning = once
