"""Speculative decoding from the command line: the teacher generates, the distilled student drafts.

    python workbench/speculate.py                                  # tiny teacher + outputs/kd_tiny/model
    python workbench/speculate.py --prompt "def quick_sort(" --prompt "class Stack:" --temperature 0.8
    python workbench/speculate.py --teacher meta-llama/Llama-2-13b-hf --draft outputs/kd_13b_to_7b/model \\
        --draft-quant nf4 --kernel triton --draft-len adaptive --compare

--teacher is a model directory or Hub id, or recipe:NAME for the final model of a recipe (trained and
cached first if needed; the default is recipe:pretrain_tiny_teacher). --draft is a model directory, or a
peft adapter directory (loaded unmerged over its base; --merge merges it). --compare also decodes with the
teacher alone and prints the speed-up (and, at temperature 0, checks the tokens are identical). --chat
sends each prompt as a user message in the teacher's chat template. --compile runs every decoding step
after the prompt through torch.compile over a static KV cache (as gpt-fast does; same tokens, see BENCHMARKS.md
for when it pays).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the package, not our siblings
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from workbench.config import interruptible  # noqa: E402

import torch

log = logging.getLogger("workbench")


def load_decoder(name: str, role: str, *, device, dtype: str = "float32", quantize: str = "none",
                 kernel: str = "bnb", merge: bool = False):
    """models.load_for_inference, where `name` may also be recipe:NAME (that recipe's cached final model,
    trained first if needed)."""
    from workbench.models import load_for_inference

    if name.startswith("recipe:"):
        from accelerate import Accelerator

        from workbench.config import load_recipe
        from workbench.train import ensure_trained

        recipe = name[len("recipe:"):]
        try:  # train it (if not cached) at the recipe's own precision, as a dependent recipe's run would
            acc = Accelerator(cpu=device.type == "cpu", mixed_precision=load_recipe(recipe).train.mixed_precision)
        except ValueError:  # this process's accelerate state already has another precision
            acc = Accelerator(cpu=device.type == "cpu")
        name = str(ensure_trained(recipe, acc))
    return load_for_inference(name, role, device=device, dtype=dtype, quantize=quantize, kernel=kernel, merge=merge)


def domain_vocab(data, tok, n: int, vocab: int) -> torch.Tensor:
    """The ids a frequent-token draft keeps: the `n` most frequent in `data`'s (a DataConfig) training
    documents, plus EOS, BOS and padding."""
    from workbench.data import training_token_ids
    from workbench.speculative import frequent_tokens

    return frequent_tokens(training_token_ids(data, tok), n, vocab,
                           always=[tok.eos_token_id, tok.bos_token_id, tok.pad_token_id])


@interruptible
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--teacher", default="recipe:pretrain_tiny_teacher", help="target model (default: %(default)s)")
    ap.add_argument("--draft", default="outputs/kd_tiny/model", help="draft model or adapter (default: %(default)s)")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable; default 'def quick_sort(')")
    ap.add_argument("--prompts-file", help="one prompt per line")
    ap.add_argument("--chat", action="store_true",
                    help="send each prompt as a user message in the teacher tokenizer's chat template (assistant "
                         "turn opened); without it a prompt is plain text, encoded as training encodes a document")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--draft-len", default="4", help="tokens drafted per verification, or 'adaptive'")
    ap.add_argument("--max-draft-len", type=int, default=12, help="upper bound for --draft-len adaptive")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--draft-quant", choices=["none", "nf4", "int8"], default="none",
                    help="hold the draft in NF4 or LLM.int8 (bitsandbytes; default: %(default)s)")
    ap.add_argument("--target-quant", "--teacher-quant", choices=["none", "nf4", "int8"], default="none",
                    help="hold the target (teacher) in NF4 or LLM.int8 (default: %(default)s). A GPTQ / AWQ "
                         "checkpoint is quantised already: leave this none")
    ap.add_argument("--kernel", choices=["bnb", "triton"], default="bnb", help="NF4 matmul kernels")
    ap.add_argument("--merge", action="store_true", help="merge an adapter draft into its base")
    ap.add_argument("--draft-vocab", type=int, metavar="N",
                    help="the draft proposes only the N most frequent tokens of --draft-vocab-from's training data "
                         "(FR-Spec: a cheaper output layer; the target still verifies over its whole vocabulary)")
    ap.add_argument("--draft-vocab-from", metavar="RECIPE", default="kd_tiny",
                    help="recipe whose training data is counted for --draft-vocab (default: %(default)s)")
    ap.add_argument("--compare", action="store_true", help="also decode with the teacher alone")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile both models' decoding steps over a static KV cache (the first batch "
                         "compiles: worth it for many prompts)")
    ap.add_argument("--json", help="write the statistics to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from workbench import third_party_warnings_once

    third_party_warnings_once()

    from workbench.models import is_hub_id
    from workbench.sampling import check_sampling

    try:
        adaptive = args.draft_len == "adaptive"
        if not adaptive and not args.draft_len.strip().isdigit():
            raise ValueError(f"--draft-len: a number of tokens or 'adaptive', not {args.draft_len!r}")
        draft_len = 4 if adaptive else int(args.draft_len)
        if draft_len < 0 or args.max_new_tokens < 1 or args.batch_size < 1 or args.max_draft_len < 1:
            raise ValueError("--draft-len, --max-draft-len, --max-new-tokens and --batch-size must be positive")
        try:
            check_sampling(args.temperature, args.top_k, args.top_p)
        except ValueError as e:
            raise ValueError(f"--{e}".replace("top_", "top-", 1)) from None
        if args.json and (Path(args.json).is_dir() or not Path(args.json).expanduser().parent.is_dir()):
            raise ValueError(f"--json {args.json}: not a file in an existing directory")
        if args.draft_vocab is not None and args.draft_vocab < 1:
            raise ValueError("--draft-vocab must be at least 1")
        vocab_data = None
        if args.draft_vocab:
            from workbench.config import RecipeError, load_recipe

            try:
                vocab_data = load_recipe(args.draft_vocab_from).data
            except RecipeError as e:
                raise ValueError(f"--draft-vocab-from: {e}") from None
        prompts = list(args.prompt or [])
        if args.prompts_file:
            try:
                text = Path(args.prompts_file).read_text()
            except UnicodeDecodeError:
                raise ValueError(f"--prompts-file {args.prompts_file}: not UTF-8 text") from None
            except OSError as e:
                raise ValueError(f"--prompts-file {args.prompts_file}: {e.strerror or e}") from None
            found = [line for line in text.splitlines() if line.strip()]
            if not found:  # (the default prompt in its place would answer a question not asked)
                raise ValueError(f"--prompts-file {args.prompts_file}: no prompts in it (one per line, "
                                 "blank lines skipped)")
            prompts += found
        if not args.chat and "" in prompts:
            raise ValueError("--prompt '': an empty prompt gives the models nothing to continue")
        prompts = prompts or ["def quick_sort("]
        draft_dir = Path(args.draft)
        if not args.draft.startswith("recipe:") and not is_hub_id(args.draft) and not draft_dir.is_dir():
            raise FileNotFoundError(f"no draft model at {draft_dir}: train one first (e.g. accelerate launch "
                                    "workbench/train.py recipe=kd_tiny) or pass --draft")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from workbench.config import WorkbenchError
    from workbench.models import check_same_vocabulary, load_tokenizer

    models = f"--teacher {args.teacher}, --draft {args.draft}"  # named in an error line about them
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    try:
        teacher = load_decoder(args.teacher, "teacher", device=device, dtype=dtype, quantize=args.target_quant,
                               kernel=args.kernel)
        draft = load_decoder(args.draft, "draft", device=device, dtype=dtype, quantize=args.draft_quant,
                             kernel=args.kernel, merge=args.merge)
        tok = load_tokenizer(teacher.config._name_or_path, "teacher tokenizer")
        draft_tok_dir = draft_dir if (draft_dir / "tokenizer_config.json").is_file() else teacher.config._name_or_path
        check_same_vocabulary(tok, load_tokenizer(draft_tok_dir, "draft tokenizer"), teacher, draft)
    except WorkbenchError as e:
        print(f"error: {e} ({models})", file=sys.stderr)
        return 2
    if args.chat:
        if not getattr(tok, "chat_template", None):
            print(f"error: --chat: the teacher's tokenizer ({args.teacher}) has no chat template", file=sys.stderr)
            return 2
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                   for p in prompts]
    from workbench.speculative import check_prompts_fit

    try:
        check_prompts_fit((teacher, draft), tok, prompts, args.chat, args.max_new_tokens,
                          f"--max-new-tokens {args.max_new_tokens}")
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if vocab_data is not None:
        from workbench.speculative import restrict_draft_vocab

        vocab = teacher.get_output_embeddings().weight.shape[0]
        if args.draft_vocab >= vocab:  # (drafting over all of them: it restricted nothing, silently)
            print(f"error: --draft-vocab {args.draft_vocab}: the vocabulary has {vocab} tokens; give fewer, or leave "
                  "--draft-vocab out to draft over all of them", file=sys.stderr)
            return 2
        keep = domain_vocab(vocab_data, tok, args.draft_vocab, vocab)
        restrict_draft_vocab(draft, keep)
        log.info("draft proposes %d of %d tokens (the most frequent in %s's training data)", len(keep), vocab,
                 args.draft_vocab_from)

    from workbench.sampling import UndrawableProbabilities

    try:
        result = decode_prompts(teacher, draft, tok, prompts, args, draft_len, adaptive, device)
    except UndrawableProbabilities as e:  # a model with non-finite weights, when sampling
        print(f"error: {e} ({models})", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:
        from workbench.config import out_of_memory

        if out_of_memory(e) is None:
            raise
        print(f"error: {out_of_memory(e)} decoding {len(prompts)} prompts in batches of {args.batch_size}: lower "
              "--batch-size or --max-new-tokens", file=sys.stderr)
        return 2
    if args.json:
        from workbench.rundir import write_file

        try:
            write_file(Path(args.json).expanduser(), json.dumps(result, indent=2))
        except (OSError, WorkbenchError) as e:
            print(f"error: --json {args.json}: {e}", file=sys.stderr)
            return 2
    return 0


def decode_prompts(teacher, draft, tok, prompts, args, draft_len, adaptive, device) -> dict:
    """Decode `prompts` in batches with speculative decoding (and the teacher alone with --compare);
    print the texts and the statistics, return them."""
    from workbench.data import encode_prompts
    from workbench.speculative import DraftTuner, SpecStats, left_padding, speculative_generate, target_generate

    left_padding(tok)
    common = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    runs = {"speculative": SpecStats(), **({"teacher_alone": SpecStats()} if args.compare else {})}
    texts, same = [], True
    tuner = DraftTuner(draft_len, args.max_draft_len) if adaptive else False  # carried from batch to batch
    from tqdm.auto import tqdm

    starts = range(0, len(prompts), args.batch_size)
    for i in tqdm(starts, desc="decoding", unit="batch", disable=len(starts) < 2):
        batch = encode_prompts(tok, prompts[i : i + args.batch_size], device, rendered=args.chat)
        g = torch.Generator(device=device).manual_seed(args.seed + i)
        out = speculative_generate(teacher, draft, batch.input_ids, args.max_new_tokens,
                                   attention_mask=batch.attention_mask, draft_len=draft_len, adaptive=tuner,
                                   max_draft_len=args.max_draft_len, generator=g, compile=args.compile, **common)
        runs["speculative"].add(out.stats)
        P = batch.input_ids.shape[1]
        texts += tok.batch_decode(out.sequences[:, P:], skip_special_tokens=True)
        if args.compare:
            alone = target_generate(teacher, batch.input_ids, args.max_new_tokens,
                                    attention_mask=batch.attention_mask,
                                    generator=torch.Generator(device=device).manual_seed(args.seed + i),
                                    compile=args.compile, **common)
            runs["teacher_alone"].add(alone.stats)
            same = same and torch.equal(alone.sequences, out.sequences)
    for prompt, text in zip(prompts, texts):
        print(f"--- {prompt!r}\n{prompt}{text}")
    s = runs["speculative"]
    print(f"\nspeculative decoding: {s.new_tokens} tokens, {s.tokens_per_second:.1f} tokens/s, acceptance rate "
          f"{s.acceptance_rate:.3f}, {s.tokens_per_target_call:.2f} tokens per target call, mean draft length "
          f"{s.mean_draft_len:.2f}; time: draft {s.draft_seconds:.2f} s, "
          f"target {s.target_seconds:.2f} s")
    result = {name: r.as_dict() for name, r in runs.items()}
    if args.compare:
        a = runs["teacher_alone"]
        result["speedup"] = s.tokens_per_second / max(a.tokens_per_second, 1e-9)
        print(f"teacher alone: {a.tokens_per_second:.1f} tokens/s -> speed-up {result['speedup']:.2f}x")
        if args.temperature == 0:
            result["identical_to_teacher"] = same
            print(f"greedy tokens identical to the teacher's own: {same}")
    return result


if __name__ == "__main__":
    sys.exit(main())
