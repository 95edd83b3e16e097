"""Shared fixtures: an isolated cache per test session and fast recipe overrides (2-layer models,
a few dozen standard-library files, 32-token sequences), so the whole suite runs on 2 CPU cores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run in Triton's CPU interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
try:  # an install (editable or not) maps kernels/ to workbench.kernels; the bare checkout only has the rest
    import workbench  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def one_error_line(code: int, err: str) -> str:
    """The one line a command that failed as a user should see it failing printed: exit status 2, a single
    'error:' line on stderr, no traceback. -> that line."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:") or "Traceback" in ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (code, err[-3000:])
    return lines[0]


# Small and quick: what every end-to-end test starts from.
FAST = [
    "data.max_documents=40",
    "data.vocab_size=320",
    "data.seq_len=32",
    "data.val_fraction=0.1",
    "student.tiny=llama-2layer-64",
    "train.micro_batch_size=4",
    "train.max_steps=6",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.checkpoint_every=3",
    "output.tensorboard=false",
    "eval.report=false",  # tests/test_evaluation.py covers the report
]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tokenizers, packed data and cached teachers go to a per-session directory."""
    path = tmp_path_factory.mktemp("wbcache")
    old = os.environ.get("WORKBENCH_CACHE")
    os.environ["WORKBENCH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("WORKBENCH_CACHE", None)
    else:
        os.environ["WORKBENCH_CACHE"] = old


@pytest.fixture(scope="session")
def accelerator():
    """One Accelerator per process (accelerate keeps global state)."""
    from accelerate import Accelerator

    return Accelerator(step_scheduler_with_optimizer=False)


@pytest.fixture(autouse=True)
def _accelerate_state_intact():
    """transformers' TrainingArguments resets accelerate's global state (the TRL baselines of the benchmark
    tests): re-initialise it after such a test, so that the session's Accelerator works in the tests after
    it whatever their order (they failed with "AcceleratorState object has no attribute num_processes")."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        if not AcceleratorState._shared_state:
            Accelerator(step_scheduler_with_optimizer=False)


def fast_recipe(name: str, out: Path, *overrides: str):
    from workbench.config import load_recipe

    return load_recipe(name, [*FAST, f"output.dir={out}", *overrides])


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, accelerator) -> Path:
    """A 2-layer teacher (width 128) pre-trained for 30 steps on the fast corpus: a local model directory."""
    from workbench.train import run

    out = tmp_path_factory.mktemp("teacher")
    recipe = fast_recipe(
        "pretrain_tiny_teacher", out,
        "student.config={hidden_size: 128, intermediate_size: 256}", "student.tiny=llama-2layer-64",
        "train.max_steps=30", "train.lr=3e-3", "train.checkpoint_every=0", "train.eval_every=0",
    )
    run(recipe, accelerator)
    return out / "model"


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need CUDA: skipped (with the reason) without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
