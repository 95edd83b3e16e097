"""workbench: distil large language models into small students, LoRA/QLoRA over NF4 bases, and
speculative decoding with the distilled student as draft. See README.md and ../shared/DESIGN.md."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend tries, at import, to fetch an optional kernel from the Hub and logs a
# warning asking to `pip install kernels` when it cannot; it falls back to its own code, so say nothing.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# Tied input/output embeddings are stored once in checkpoints, as they should be; accelerate warns
# about it at every save.
logging.getLogger("accelerate.utils.other").addFilter(lambda r: "Removed shared tensor" not in r.getMessage())
