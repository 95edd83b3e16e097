"""What every benchmark prints with its numbers: the machine and library versions, and the append to
BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def machine() -> str:
    """CPU model, cores, GPU (if any) and the versions that matter, in one line."""
    import torch
    import transformers

    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")


def append_to_benchmarks(text: str) -> Path:
    path = REPO / "BENCHMARKS.md"
    with path.open("a") as f:
        f.write("\n" + text.rstrip("\n") + "\n")
    return path
