"""QLoRA memory: bytes of a model in full precision and in NF4 (CPU, any machine), and on a CUDA GPU the
peak memory and time of one QLoRA training step with bitsandbytes' kernels vs ours.

    python -m workbench.bench.qlora_memory --tiny DIR --cpu-7b   # CPU: model bytes, fp32 / bf16 / NF4
    python -m workbench.bench.qlora_memory --gpu                  # + GPU step: Llama-2-7B-shaped layers

The GPU model has Llama-2-7B's widths (4096 hidden, 11008 MLP, 32 heads, 32000 vocabulary) with --layers
blocks and random weights (no download); LoRA r=16 on every linear layer, gradient checkpointing, batch 1
x 2048 tokens, bf16 compute. Prints a Markdown section (and writes it to --out when given).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import torch


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _quant_state_bytes(qs) -> int:
    """Bytes of a bitsandbytes QuantState: absmax, code, offset, and the nested state of double quantisation."""
    if qs is None:
        return 0
    return sum(_tensor_bytes(getattr(qs, a, None)) for a in ("absmax", "code", "offset")) + \
        _quant_state_bytes(getattr(qs, "state2", None))


def _footprint(model) -> tuple[int, float | None]:
    """(bytes of parameters + buffers + 4-bit quantisation states, bits per weight of the 4-bit linear
    layers including their states; None without any)."""
    import bitsandbytes as bnb

    total = sum(_tensor_bytes(p) for p in model.parameters()) + sum(_tensor_bytes(b) for b in model.buffers())
    q_bytes = q_weights = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state is not None:
            extra = _quant_state_bytes(m.weight.quant_state)
            total += extra
            q_bytes += _tensor_bytes(m.weight) + extra
            q_weights += m.weight.quant_state.shape.numel()
    return total, (8 * q_bytes / q_weights if q_weights else None)


def cpu_bytes(path: str) -> list[tuple[str, int, float | None]]:
    """(storage, bytes, bits per weight of the quantised linear layers) for fp32, bf16 and NF4 (double
    quantisation) with the rest in bf16 (as QLoRA holds it) or fp32."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    rows = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rows.append((name, *_footprint(AutoModelForCausalLM.from_pretrained(path, dtype=dtype))))
    for name, dtype in (("nf4 + double quant, bf16 rest", torch.bfloat16), ("nf4 + double quant, fp32 rest", torch.float32)):
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": "cpu"}, quantization_config=q)
        rows.append((name, *_footprint(model)))
    return rows


def gpu_step(kernel: str, workdir: str, device: str = "cuda", tokens: int = 2048) -> dict:
    """One timed QLoRA step (after two warm-up steps) of the model saved in `workdir`, with bitsandbytes'
    kernels or ours: peak and resident memory (CUDA only), seconds, loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from workbench.models import _keep_bnb_layout

    cuda = torch.device(device).type == "cuda"
    # what an earlier call left allocated is not this step's: on the H200 (2026-12-04) the second model
    # measured (ours) showed 0.39-0.40 GiB more than the first at both peak and rest, a constant offset
    # about the size of the first model's 4-bit blocks, freed only by the cycle collector
    gc.collect()
    base = 0
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
    model = AutoModelForCausalLM.from_pretrained(
        workdir, dtype=torch.bfloat16, device_map={"": device},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    _keep_bnb_layout(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    ours = 0  # 4-bit layers computed by workbench.kernels
    if kernel == "triton":
        from workbench.kernels.linear import replace_linear4bit

        ours = replace_linear4bit(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    for i in range(3):  # the first steps compile kernels and allocate optimizer state
        if i == 2:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    out = dict(kernel=kernel, step_s=time.perf_counter() - t0, loss=loss.item(), our_layers=ours,
               peak_gib=(torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None,
               weights_gib=(torch.cuda.memory_allocated() - base) / 2**30 if cuda else None)
    del model, opt, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def _llama7b_shaped(path: str, layers: int, device: str) -> None:
    """Save a model with Llama-2-7B's widths, `layers` blocks and random weights (no download) to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)


def main(argv=None) -> int:
    from workbench.bench import _report

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="also measure a QLoRA step on the GPU (bnb vs ours)")
    ap.add_argument("--layers", type=int, default=4, help="blocks of the Llama-2-7B-shaped model")
    ap.add_argument("--tiny", default=None, help="a local model directory for the CPU byte count")
    ap.add_argument("--cpu-7b", action="store_true", help="CPU byte count of the Llama-2-7B-shaped model too")
    ap.add_argument("--out", default=None, help="also write qlora_memory.md here")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    lines = [f"### QLoRA memory ({time.strftime('%Y-%m-%d')})", "", f"Machine: {_report.machine()}.", ""]
    targets = [(args.tiny, f"`{args.tiny}`")] if args.tiny else []
    with tempfile.TemporaryDirectory() as d:
        if args.cpu_7b:
            _llama7b_shaped(d, args.layers, "cpu")
            targets.append((d, f"a Llama-2-7B-shaped model with {args.layers} blocks (random weights)"))
        for path, what in targets:
            rows = cpu_bytes(path)
            lines += [f"Bytes of {what}, measured on CPU: parameters, buffers and 4-bit quantisation states "
                      "(absmax, nested absmax, codebooks). Only the blocks' linear layers are quantised; the "
                      "embeddings, output layer and norms keep the rest's dtype.", "",
                      "| storage | bytes | vs fp32 | bits per weight of the quantised layers |",
                      "| --- | ---: | ---: | ---: |"]
            lines += [f"| {name} | {b:,} | {b / rows[0][1]:.3f}x | {'-' if bits is None else f'{bits:.3f}'} |"
                      for name, b, bits in rows]
            lines.append("")
    if args.gpu:
        with tempfile.TemporaryDirectory() as d:
            _llama7b_shaped(d, args.layers, "cuda")
            torch.cuda.empty_cache()
            results = [gpu_step(k, d) for k in ("bnb", "triton")]
        name = torch.cuda.get_device_name(0)
        lines += [f"One QLoRA step on {name}: Llama-2-7B widths, {args.layers} blocks, random weights, NF4 + double "
                  "quantisation, LoRA r=16 on all linear layers, gradient checkpointing, 1 x 2048 tokens, bf16.", "",
                  "| kernels | peak GiB | resident GiB after step | step s | loss |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['kernel']} | {r['peak_gib']:.2f} | {r['weights_gib']:.2f} | {r['step_s']:.3f} | {r['loss']:.4f} |"
                  for r in results]
    text = "\n".join(lines) + "\n"
    _report.publish(text, record=not args.no_record)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "qlora_memory.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
