"""workbench: distil large language models into small students, LoRA/QLoRA over NF4 bases, and
speculative decoding with the distilled student as draft. See README.md and ../shared/DESIGN.md."""

import logging
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
