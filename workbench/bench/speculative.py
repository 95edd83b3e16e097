"""Speculative decoding on the embedded default: the tiny teacher alone vs our speculative decoding vs
Hugging Face's assisted generation, with KD-distilled students (kd_tiny: forward KL + cross-entropy;
kd_tiny_draft: forward KL alone) and the no-distillation student (sft_tiny) of the same size as drafts.

    python -m workbench.bench.speculative                 # appends a section to BENCHMARKS.md
    python -m workbench.bench.speculative --prompts 4 --max-new-tokens 32 --no-record   # a quick look

Prompts are held-out standard-library files (the validation split of the corpus the models were trained
on) cut right after a `def name(` line start, at most --context characters from a line start. Every method
decodes the same prompts to EOS or --max-new-tokens; at temperature 0 all of them must produce the
teacher's own greedy tokens (checked). Batch 1 unless the row says otherwise; a full-length warm-up pass
per model first.
Tokens per target call divides by all of the teacher's forward passes (counted by a hook for HF's), the
prompt's included: both fold the prompt into the first verification.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from workbench.bench import _report
from workbench.data import encode_prompts


def held_out_prompts(n: int, context_chars: int, data=None, tok=None) -> tuple[list[str], bool]:
    """`n` prompts from held-out data (`data`: a DataConfig, default the embedded corpus) and whether they
    are rendered rows (evaluation.task_prompts): for text, held-out files cut after 'def name(' at a line
    start; for chat or prompt/completion rows (the function task), held-out rows' prompts in `tok`'s chat
    template."""
    from workbench.config import DataConfig
    from workbench.data import load_corpus
    from workbench.evaluation import task_prompts

    pairs, rendered = task_prompts(load_corpus(data or DataConfig()), tok, n, context_chars, DEF_LINE)
    return [p for p, _ in pairs], rendered


DEF_LINE = r"^[ \t]*def \w+\("
TINY_TEACHER = "recipe:pretrain_tiny_teacher"


class _CallCounter:
    """Counts forward passes of a model."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


def _hf(teacher, tok, prompts, rendered, max_new, assistant=None, batch=1, num_assistant_tokens=None):
    """HF generate, greedy: -> (sequences per prompt, tokens, seconds, target forward passes)."""
    saved = None if assistant is None else copy.deepcopy(assistant.generation_config)
    if assistant is not None and num_assistant_tokens is not None:  # a fixed k, as ours
        assistant.generation_config.num_assistant_tokens = num_assistant_tokens
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.generation_config.assistant_confidence_threshold = 0.0
    from workbench.speculative import _Clock

    counter, clock = _CallCounter(teacher), _Clock(teacher.device)
    seqs, tokens, seconds = [], 0, 0.0
    try:
        for i in range(0, len(prompts), batch):
            enc = encode_prompts(tok, prompts[i : i + batch], teacher.device, rendered=rendered)
            t = clock()
            out = teacher.generate(**enc, max_new_tokens=max_new, do_sample=False, assistant_model=assistant,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            seconds += clock() - t
            for row in out[:, enc.input_ids.shape[1]:].tolist():
                seqs.append(_until_eos(row, tok.eos_token_id))
                tokens += len(seqs[-1])
    finally:
        counter.handle.remove()
        if saved is not None:
            assistant.generation_config = saved
    return seqs, tokens, seconds, counter.n


_COMPILE = False  # --compile: every run of ours decodes through torch.compile over a static cache


def _ours(teacher, draft, tok, prompts, rendered, max_new, batch=1, **kw):
    if kw.setdefault("compile", _COMPILE):
        # compiled: every batch size, cache bucket (prompt length) and verification length is a graph of its
        # own, compiled at first use; the whole row runs once untimed so that the timed run compiles nothing
        # (an adaptive row's tuner may still try a length the first run did not)
        _ours_run(teacher, draft, tok, prompts, rendered, max_new, batch, **kw)
    return _ours_run(teacher, draft, tok, prompts, rendered, max_new, batch, **kw)


def _ours_run(teacher, draft, tok, prompts, rendered, max_new, batch=1, **kw):
    from workbench.speculative import DraftTuner, SpecStats, speculative_generate

    if kw.get("adaptive") is True:  # one tuner over all prompts, as HF's schedule carries its length over
        kw["adaptive"] = DraftTuner(kw.pop("draft_len", 4), kw.pop("max_draft_len", 12))
    total, seqs = SpecStats(), []
    for i in range(0, len(prompts), batch):
        enc = encode_prompts(tok, prompts[i : i + batch], teacher.device, rendered=rendered)
        out = speculative_generate(teacher, draft, enc.input_ids, max_new, attention_mask=enc.attention_mask,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   generator=torch.Generator(teacher.device).manual_seed(i), **kw)
        total.add(out.stats)
        seqs += [_until_eos(row, tok.eos_token_id) for row in out.sequences[:, enc.input_ids.shape[1]:].tolist()]
    return seqs, total


def _until_eos(row: list[int], eos: int) -> list[int]:
    """New tokens up to and including the first EOS (what follows it is padding)."""
    return row[: row.index(eos) + 1] if eos in row else row


def _draft_path(name: str) -> str:
    """A recipe's trained model: outputs/NAME/model when the quickstart left one, else recipe:NAME (cached
    run, trained on first use); anything else (a directory, a Hub id) as given."""
    if "/" in name or name.startswith("recipe:"):
        return name
    local = Path("outputs") / name / "model"
    return str(local) if (local / "config.json").is_file() else f"recipe:{name}"


def prompts_for(teacher, args):
    """The teacher's tokenizer (left padding), the data the prompts come from (args.prompts_from's, or None:
    the embedded corpus) and args.prompts held-out prompts -> (tok, data, prompts, rendered)."""
    from transformers import AutoTokenizer

    from workbench.speculative import left_padding

    tok = left_padding(AutoTokenizer.from_pretrained(teacher.config._name_or_path))
    data = None
    if args.prompts_from:
        from workbench.config import load_recipe

        data = load_recipe(args.prompts_from).data
    return (tok, data, *held_out_prompts(args.prompts, args.context, data, tok))


def task_words(args) -> str:
    """What the prompts are, for a benchmark's section."""
    return (f"held-out rows of `{args.prompts_from}`'s data (chat template)" if args.prompts_from
            else f"held-out prompts ending in `def name(` (at most {args.context} characters)")


def run(args) -> str:
    from workbench.speculate import load_decoder
    from workbench.speculative import cuda_graphs

    dev = torch.device(args.device)
    names = [n.strip() for n in args.drafts.split(",") if n.strip()]
    if args.baseline not in names:
        names.append(args.baseline)
    paths = {n: _draft_path(n) for n in names}
    teacher = load_decoder(args.teacher, "teacher", device=dev, dtype=args.dtype)
    draft_dtype = args.draft_dtype or args.dtype
    drafts = {n: load_decoder(p, "draft", device=dev, dtype=draft_dtype, quantize=args.draft_quant)
              for n, p in paths.items()}
    tok, data, prompts, rendered = prompts_for(teacher, args)
    restricted = None  # the name of the frequent-token variant of the first draft
    if args.draft_vocab:  # FR-Spec: the first draft again, proposing only the domain's most frequent tokens
        from workbench.config import DataConfig
        from workbench.speculate import domain_vocab
        from workbench.speculative import restrict_draft_vocab

        V = teacher.get_output_embeddings().weight.shape[0]
        keep = domain_vocab(data or DataConfig(), tok, args.draft_vocab, V)
        restricted = f"{names[0]}, top {len(keep)} tokens"
        drafts[restricted] = restrict_draft_vocab(copy.deepcopy(drafts[names[0]]), keep)
        paths[restricted] = paths[names[0]]
        names.append(restricted)
    global _COMPILE
    _COMPILE = args.compile
    if args.compile:  # each verification length the tuner may try is one more compiled graph of the teacher
        args.max_draft_len = min(args.max_draft_len, max(args.draft_len) + 2)
    N, ks = args.max_new_tokens, args.draft_len
    k = ks[0]  # the draft length of the HF, batched, sampled and cost rows (and adaptive's start)

    # warm-up, every model at full length: on an H200 one short pass left the first timed rows cold (the
    # teacher's first HF row 58.8 tokens/s against 87.2 when rerun; the first draft's k=4 row 60.8 against
    # 129.6 for its adaptive row at the same acceptance)
    _hf(teacher, tok, prompts[:2], rendered, N)
    for draft in drafts.values() if not args.compile else ():  # compiled, every row runs once untimed first
        _ours(teacher, draft, tok, prompts[:2], rendered, N, draft_len=k)
    rows = []  # (method, draft, batch, tokens/s, acceptance, tokens per target call, identical)
    ref, tokens, sec, calls = _hf(teacher, tok, prompts, rendered, N)
    base = tokens / sec
    rows.append(("teacher alone, HF generate", "-", 1, base, None, tokens / max(calls, 1), True))
    seqs, s = _ours(teacher, None, tok, prompts, rendered, N, draft_len=0)
    rows.append(("teacher alone, ours", "-", 1, s.tokens_per_second, None, s.tokens_per_target_call, seqs == ref))
    fixed = {}  # draft name -> stats of the fixed-k run (the first k)
    for name, draft in drafts.items():
        runs = [(f"ours, k={j}", dict(draft_len=j)) for j in ks]
        for label, kw in runs + [("ours, adaptive k", dict(draft_len=k, adaptive=True,
                                                             max_draft_len=args.max_draft_len))]:
            seqs, s = _ours(teacher, draft, tok, prompts, rendered, N, **kw)
            fixed.setdefault(name, s)
            rows.append((label, name, 1, s.tokens_per_second, s.acceptance_rate, s.tokens_per_target_call, seqs == ref))
        for label, nat in ((f"HF assisted, k={k}", k), ("HF assisted, its defaults", None)):
            seqs, tokens, sec, calls = _hf(teacher, tok, prompts, rendered, N, assistant=draft, num_assistant_tokens=nat)
            rows.append((label, name, 1, tokens / sec, None, tokens / max(calls, 1), seqs == ref))
    # the baseline again, after the draft rows: one measurement of it on a shared CPU can be far off (11.7 vs
    # 19.7 tokens/s in two runs), and every speed-up is a ratio to it; the faster of the two counts
    seqs, tokens, sec, calls = _hf(teacher, tok, prompts, rendered, N)
    rows.append(("teacher alone, HF generate, again", "-", 1, tokens / sec, None, tokens / max(calls, 1), seqs == ref))
    base = max(base, tokens / sec)
    if args.compile:  # a compiled teacher alone is a baseline a user could have too
        base = max(base, rows[1][3])
    B = args.batch
    ref_b, tokens, sec, calls = _hf(teacher, tok, prompts, rendered, N, batch=B)
    rows.append(("teacher alone, HF generate", "-", B, tokens / sec, None, None, ref_b == ref))
    for name, draft in drafts.items():
        seqs, s = _ours(teacher, draft, tok, prompts, rendered, N, batch=B, draft_len=k)
        rows.append((f"ours, k={k}", name, B, s.tokens_per_second, s.acceptance_rate, s.tokens_per_target_call,
                     seqs == ref_b))
    sampled = {name: _ours(teacher, draft, tok, prompts, rendered, N, draft_len=k, temperature=1.0)[1]
               for name, draft in drafts.items()}

    def described(name):
        return f"`{name}` (`{paths[name]}`)"

    drafts_held = "" if (draft_dtype, args.draft_quant) == (args.dtype, "none") else (
        f" (drafts: {draft_dtype}" + ("" if args.draft_quant == "none" else f", {args.draft_quant}") + ")")
    where = "the embedded default" if args.teacher == TINY_TEACHER else f"`{args.teacher}` as the target"
    task = task_words(args)
    lines = [f"### Speculative decoding on {where} ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {_report.machine()}. Teacher `{args.teacher}` ({_millions(teacher)} parameters); drafts "
             f"{', '.join(described(n) for n in names)} ({_millions(drafts[names[0]])} each, same size and steps; "
             f"`{args.baseline}` without distillation). {len(prompts)} {task}, greedy, up to {N} new tokens each; {args.dtype} on {dev.type}{drafts_held}"
             + (", ours compiled (torch.compile over a static KV cache"
                + (", CUDA graphs" if cuda_graphs(teacher) else "")
                + f"; adaptive k up to {args.max_draft_len}), HF's rows as HF runs them" if args.compile else "")
             + ". Speed-up is tokens/s over the faster of the two 'teacher alone, HF generate' rows at batch 1 "
             "(measured first and again after the draft rows" + (", or 'teacher alone, ours' if faster" if args.compile
                                                                 else "")
             + "); 'same tokens' checks the teacher's own greedy output.", "",
             "| method | draft | batch | tokens/s | speed-up | acceptance rate | tokens per target call | same tokens |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for method, draft, b, tps, acc, tpc, same in rows:
        lines.append(f"| {method} | {draft} | {b} | {tps:.1f} | {tps / base:.2f}x | "
                     f"{'-' if acc is None else f'{acc:.3f}'} | {'-' if tpc is None else f'{tpc:.2f}'} | {same} |")
    greedy = {(r[1], j): r[5] for j in ks for r in rows if r[0] == f"ours, k={j}" and r[2] == 1}
    lines += ["", f"Sampling at temperature 1 (ours, k={k}): " + "; ".join(
        f"`{n}` acceptance rate {sampled[n].acceptance_rate:.3f}, tokens per target call "
        f"{sampled[n].tokens_per_target_call:.2f}" for n in names) + "."]
    if args.draft_vocab:
        lines.append(f"'top N tokens': the draft's output layer cut to the N most frequent tokens of the training "
                     f"data (FR-Spec); the target still verifies over all {V:,}.")
    for n in names:
        if n not in (args.baseline, restricted):
            at_each_k = ", ".join(f"{greedy[n, j] / greedy[args.baseline, j]:.2f}x at k={j}" for j in ks)
            lines.append(f"Distilled `{n}` vs undistilled `{args.baseline}`, tokens per target call: greedy "
                         f"{at_each_k}; sampled at k={k} "
                         f"{sampled[n].tokens_per_target_call / sampled[args.baseline].tokens_per_target_call:.2f}x.")
    lines.append(f"Accepted drafts per verification, greedy, k={k}: " + "; ".join(
        f"`{n}` {fixed[n].accepted_hist}" for n in names) + ".")
    alone = rows[1][3]  # tokens/s of our teacher-alone loop
    for n in [names[0]] + ([restricted] if restricted else []):
        s = fixed[n]  # at fixed k
        draft_ms = 1e3 * s.draft_seconds / max(sum(s.draft_lens), 1)
        verify_ms = 1e3 * s.target_seconds / max(s.target_calls, 1)
        round_ms = k * draft_ms + verify_ms
        lines.append(f"Cost split (`{n}`, k={k}): a draft forward takes {draft_ms:.2f} ms, a verification of "
                     f"{k + 1} tokens {verify_ms:.2f} ms, the teacher alone {1e3 / alone:.2f} ms per token. A round "
                     f"takes {round_ms:.2f} ms for {s.tokens_per_target_call:.2f} tokens "
                     f"({round_ms / s.tokens_per_target_call:.2f} ms per token); the draft costs "
                     f"{draft_ms * alone / 1e3:.2f} of a teacher step.")
    lines.append("Speculative decoding pays off when the draft is far cheaper than its target.")
    return "\n".join(lines) + "\n"


def _lengths(text: str) -> list[int]:
    try:
        ks = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of draft lengths: {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError("draft lengths must be at least 1")
    return ks


def _millions(model) -> str:
    from workbench.models import count_parameters

    return f"{count_parameters(model) / 1e6:.1f}M"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default=TINY_TEACHER)
    ap.add_argument("--drafts", default="kd_tiny,kd_tiny_draft,sft_tiny",
                    help="comma-separated drafts: recipe names (outputs/NAME/model if there, else recipe:NAME), "
                         "model directories or Hub ids")
    ap.add_argument("--baseline", default="sft_tiny", help="the undistilled draft the others are compared with")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--draft-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="the drafts' precision (default: --dtype); the target keeps --dtype")
    ap.add_argument("--draft-quant", choices=["none", "nf4", "int8"], default="none",
                    help="hold the drafts in NF4 or LLM.int8 (bitsandbytes)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--context", type=int, default=300, help="characters of held-out file before 'def name('")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--draft-len", type=_lengths, default=[4],
                    help="tokens drafted per verification, or several (2,4): a fixed-k row for each; the first "
                         "is used by the HF, batched, sampled and cost rows (default: 4)")
    ap.add_argument("--max-draft-len", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8, help="batch size of the batched rows")
    ap.add_argument("--prompts-from", metavar="RECIPE",
                    help="held-out prompts (and token counts for --draft-vocab) from this recipe's data")
    ap.add_argument("--draft-vocab", type=int, metavar="N",
                    help="also run the first draft restricted to the N most frequent training tokens (FR-Spec)")
    ap.add_argument("--compile", action="store_true",
                    help="our rows decode through torch.compile over a static KV cache (adaptive k then drafts "
                         "at most k + 2; CUDA graphs on a GPU with WORKBENCH_CUDA_GRAPHS=1); HF's rows stay as "
                         "HF runs them by default")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    return _report.run_and_publish(run, args)


if __name__ == "__main__":
    sys.exit(main())
