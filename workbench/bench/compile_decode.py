"""torch.compile of decoding (speculate.py --compile: a static KV cache, as gpt-fast does) against eager:
the target alone and speculative decoding with one draft, batch 1, greedy, on held-out prompts.

    python -m workbench.bench.compile_decode                   # tiny teacher, kd_tiny draft; appends to BENCHMARKS.md
    python -m workbench.bench.compile_decode --teacher DIR --draft outputs/kd_smollm2/model --prompts-from kd_smollm2

Every method decodes all prompts twice: the first pass holds the compilation (its time minus the second's
is the compile time), the second pass gives tokens/s. Tokens must equal the eager target's (checked).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from workbench.bench import _report
from workbench.bench.speculative import TINY_TEACHER, _draft_path, _millions, _ours, held_out_prompts


def run(args) -> str:
    from transformers import AutoTokenizer

    from workbench.speculate import load_decoder
    from workbench.speculative import left_padding

    dev = torch.device(args.device)
    teacher = load_decoder(args.teacher, "teacher", device=dev, dtype=args.dtype)
    draft_path = _draft_path(args.draft)
    draft = load_decoder(draft_path, "draft", device=dev, dtype=args.dtype)
    tok = left_padding(AutoTokenizer.from_pretrained(teacher.config._name_or_path))
    data = None
    if args.prompts_from:
        from workbench.config import load_recipe

        data = load_recipe(args.prompts_from).data
    prompts, rendered = held_out_prompts(args.prompts, args.context, data, tok)
    N, k = args.max_new_tokens, args.draft_len
    rows, ref = [], None  # (method, compiled, first pass s, second pass s, tokens/s, tpc, same)
    for method, d, kw in (("teacher alone", None, dict(draft_len=0)), (f"speculative, k={k}", draft, dict(draft_len=k))):
        for compiled in (False, True):
            t0 = time.perf_counter()
            _ours(teacher, d, tok, prompts, rendered, N, compile=compiled, **kw)
            first = time.perf_counter() - t0
            seqs, s = _ours(teacher, d, tok, prompts, rendered, N, compile=compiled, **kw)
            ref = seqs if ref is None else ref
            rows.append((method, compiled, first, s.total_seconds, s.tokens_per_second, s.tokens_per_target_call,
                         seqs == ref))
    alone = rows[0][4]
    lines = [f"### torch.compile of decoding, batch 1 ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {_report.machine()}. Target `{args.teacher}` ({_millions(teacher)}), draft `{draft_path}` "
             f"({_millions(draft)}); {len(prompts)} held-out prompts, greedy, up to {N} new tokens, {args.dtype}. "
             "Each method decodes every prompt twice: 'compile s' is the first pass's time minus the second's, "
             "tokens/s is the second pass's; 'same tokens' compares with the eager target alone.", "",
             "| method | step | compile s | tokens/s | vs eager target alone | tokens per target call | same tokens |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for method, compiled, first, second, tps, tpc, same in rows:
        lines.append(f"| {method} | {'compiled' if compiled else 'eager'} | {max(first - second, 0):.1f} | "
                     f"{tps:.1f} | {tps / alone:.2f}x | {tpc:.2f} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default=TINY_TEACHER)
    ap.add_argument("--draft", default="kd_tiny", help="a recipe name (outputs/NAME/model or its cached run) or a directory")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--context", type=int, default=300, help="characters of held-out file before 'def name('")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--prompts-from", metavar="RECIPE", help="held-out prompts from this recipe's data")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    _report.publish(run(args), record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
