"""Turn a training checkpoint into a plain transformers model directory.

    python -m workbench.consolidate outputs/kd_13b_to_7b/checkpoints/step-0000500 outputs/student-500

The destination must not exist or be empty (--overwrite replaces it); the model is written beside it first
and moved into place when complete, so an interrupted run leaves no half-written model.

A DeepSpeed ZeRO checkpoint (partitioned over processes) is gathered with DeepSpeed's own
`zero_to_fp32` tooling; an accelerate checkpoint (single process, DDP) is read from its model.safetensors.
The student's config and tokenizer come from the checkpoint's student/ folder. Adapter (peft) students are
saved in peft format at the end of training; this tool handles full-weight students.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the package, not our siblings
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from workbench.config import interruptible  # noqa: E402


def student_state_dict(checkpoint: Path) -> dict:
    """The student's fp32 weights from a checkpoint directory, keys as in the transformers model."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "latest").exists() or list(checkpoint.glob("pytorch_model*/")):  # DeepSpeed
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tags = [p.name for p in checkpoint.iterdir() if p.is_dir() and p.name != "student"]
        tag = (checkpoint / "latest").read_text().strip() if (checkpoint / "latest").exists() else tags[0]
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)
    else:
        from safetensors.torch import load_file

        state = load_file(str(checkpoint / "model.safetensors"))
    prefix = "student."
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"no student weights in {checkpoint}")
    return out


def consolidate(checkpoint: Path, out_dir: Path, overwrite: bool = False) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from workbench import rundir
    from workbench.models import load_tokenizer

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    student_dir = checkpoint / "student"
    if not (student_dir / "config.json").exists():
        from workbench.trainer import latest_checkpoint

        newest = latest_checkpoint(checkpoint)  # a run directory given for one of its checkpoints
        if newest is not None:
            raise FileNotFoundError(f"{checkpoint} is a run directory, not a checkpoint: give one of its checkpoints, "
                                    f"e.g. {newest}" + (f" (its final model, {checkpoint / 'model'}, is a plain "
                                                        "transformers model already)" if (checkpoint / "model").is_dir()
                                                        else ""))
        raise FileNotFoundError(f"{student_dir}/config.json missing: is {checkpoint} a workbench checkpoint?")
    rundir.refuse_to_replace(out_dir, overwrite, "destination", source=checkpoint)
    state = student_state_dict(checkpoint)
    config = AutoConfig.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint does not match the student: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tokenizer = load_tokenizer(student_dir, "the checkpoint's tokenizer")
    tmp = rundir.partial_dir(out_dir)
    with rundir.writing(tmp, out_dir):
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    rundir.move_into_place(tmp, out_dir)
    return out_dir


@interruptible
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workbench.consolidate", description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory (outputs/<run>/checkpoints/step-NNNNNNN)")
    ap.add_argument("out", help="the model directory to write")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    args = ap.parse_args(argv)
    from safetensors import SafetensorError

    from workbench.config import StorageError

    try:
        print(consolidate(Path(args.checkpoint), Path(args.out), args.overwrite))
    except (OSError, ValueError, KeyError, StorageError) as e:  # missing / unreadable files, a checkpoint of another model
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SafetensorError as e:  # a truncated or corrupt weights file
        print(f"error: {args.checkpoint}: unreadable weights ({e})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
