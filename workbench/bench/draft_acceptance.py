"""Tokens per target call of distilled drafts against undistilled ones, in pairs (one pair per seed, say):
counts only, no timings, so a busy CPU does not change a number.

    python -m workbench.bench.draft_acceptance --teacher recipe:teacher_smollm2 --prompts-from kd_smollm2 \
        --distilled kd_smollm2_draft --baseline sft_smollm2_draft --prompts 48

Every draft speculatively decodes the same held-out prompts (as `workbench.bench.speculative` picks them) at
batch 1, once per mode (`greedy:K` or `sample:K`: temperature 0 or 1, K tokens drafted a round); a prompt's
sampling generator is seeded with its index, so every draft sees the same random numbers. `--distilled` and
`--baseline` are comma-separated lists paired by position (one baseline pairs with every distilled draft);
the table gives each draft's tokens per target call, each pair's ratio and, for several pairs, the ratios'
mean, sample standard deviation and minimum.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from workbench.bench import _report
from workbench.bench.speculative import _draft_path, _millions, _ours, prompts_for, task_words


def _modes(text: str) -> list[tuple[str, int]]:
    out = []
    for part in text.split(","):
        kind, _, k = part.strip().partition(":")
        if kind not in ("greedy", "sample") or not k.isdigit() or int(k) < 1:
            raise argparse.ArgumentTypeError(f"not a mode: {part!r} (greedy:K or sample:K, K >= 1)")
        out.append((kind, int(k)))
    return out


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no draft named")
    return names


def pairs_of(distilled: list[str], baseline: list[str]) -> list[tuple[str, str]]:
    """(distilled, baseline) pairs by position; a single baseline pairs with every distilled draft."""
    if len(baseline) == 1:
        baseline = baseline * len(distilled)
    if len(baseline) != len(distilled):
        raise ValueError(f"{len(distilled)} distilled drafts and {len(baseline)} baselines: give one baseline or "
                         "one per distilled draft")
    return list(zip(distilled, baseline))


def measure(teacher, draft, tok, prompts, rendered, max_new: int, modes) -> dict:
    """-> {mode: SpecStats} of one draft over all prompts at batch 1."""
    return {(kind, k): _ours(teacher, draft, tok, prompts, rendered, max_new, draft_len=k,
                             temperature=0.0 if kind == "greedy" else 1.0)[1] for kind, k in modes}


def table(pairs, stats, modes) -> list[str]:
    head = [f"{'greedy' if kind == 'greedy' else 'sampled'} k={k}" for kind, k in modes]
    lines = ["| draft | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(modes)]
    names = list(dict.fromkeys(n for pair in pairs for n in pair))
    for n in names:
        lines.append(f"| `{n}` | " + " | ".join(f"{stats[n, m].tokens_per_target_call:.3f}" for m in modes) + " |")
    ratios = {m: [stats[d, m].tokens_per_target_call / stats[b, m].tokens_per_target_call for d, b in pairs]
              for m in modes}
    for i, (d, b) in enumerate(pairs):
        lines.append(f"| **`{d}` / `{b}`** | " + " | ".join(f"**{ratios[m][i]:.2f}x**" for m in modes) + " |")
    if len(pairs) > 1:
        lines.append(f"| ratio over {len(pairs)} pairs: mean +- sd (min) | " + " | ".join(
            f"{statistics.mean(ratios[m]):.2f}x +- {statistics.stdev(ratios[m]):.2f} ({min(ratios[m]):.2f}x)"
            for m in modes) + " |")
    return lines


def run(args) -> str:
    from workbench.speculate import load_decoder

    pairs = pairs_of(args.distilled, args.baseline)
    paths = {n: _draft_path(n) for pair in pairs for n in pair}
    dev = torch.device(args.device)
    teacher = load_decoder(args.teacher, "teacher", device=dev, dtype=args.dtype)
    tok, _, prompts, rendered = prompts_for(teacher, args)
    stats, sizes = {}, {}
    for name, path in paths.items():  # one draft in memory at a time
        draft = load_decoder(path, "draft", device=dev, dtype=args.dtype)
        sizes[name] = _millions(draft)
        for mode, st in measure(teacher, draft, tok, prompts, rendered, args.max_new_tokens, args.modes).items():
            stats[name, mode] = st
        del draft
    task = task_words(args)
    drafts = ", ".join(f"`{n}` ({'' if p == n else f'`{p}`, '}{sizes[n]})" for n, p in paths.items())
    lines = [f"### Draft acceptance: distilled vs undistilled drafts, tokens per target call ({time.strftime('%Y-%m-%d')})",
             "", f"Machine: {_report.machine()}. Target `{args.teacher}` ({_millions(teacher)} parameters), "
             f"{args.dtype} on {dev.type}; drafts {drafts}. {len(prompts)} {task}, batch 1, up to "
             f"{args.max_new_tokens} new tokens each; sampled rows at temperature 1 with each prompt's generator "
             "seeded by its index. Counts, not timings.", ""]
    return "\n".join(lines + table(pairs, stats, args.modes)) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="the target: a model directory, Hub id, recipe:NAME or gguf")
    ap.add_argument("--distilled", type=_names, required=True,
                    help="comma-separated drafts: recipe names (outputs/NAME/model if there), directories, Hub ids")
    ap.add_argument("--baseline", type=_names, required=True,
                    help="the undistilled drafts, one per --distilled draft (or one for all)")
    ap.add_argument("--modes", type=_modes, default=_modes("greedy:2,greedy:4,sample:4"),
                    help="comma-separated greedy:K / sample:K (default greedy:2,greedy:4,sample:4)")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--context", type=int, default=300, help="characters of held-out file before 'def name('")
    ap.add_argument("--prompts-from", metavar="RECIPE", help="held-out prompts from this recipe's data")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    try:
        pairs_of(args.distilled, args.baseline)
    except ValueError as e:
        ap.error(str(e))
    return _report.run_and_publish(run, args)


if __name__ == "__main__":
    sys.exit(main())
