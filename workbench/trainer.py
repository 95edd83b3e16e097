"""One explicit training loop on accelerate.

Per optimizer step: build the step's micro-batches from the step number alone (stateless data order; on-
policy samples from generators seeded by step), count the valid target tokens of the whole accumulation
window across all processes (separately for training data and MiniLLM rollouts), and scale every
micro-batch's summed loss by world_size / that count, so gradients equal those of one big batch whatever
the micro-batch size, accumulation or process count. Then clip, step, schedule.

Checkpoints (accelerate's save_state + our trainer_state.json) are written to a temporary directory and
renamed into place, so a checkpoint directory that exists is complete. Ctrl-C / SIGTERM finish the
current step, write a checkpoint and return; `resume=true` continues with identical losses.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench import distributed as dist
from workbench import onpolicy, rundir
from workbench.config import (LossTerm, Recipe, RecipeError, StorageError, TrainingDiverged, in_every_process,
                              storage_error)
from workbench.data import Blocks, PackedData, make_batch, mask_labels, stream_indices
from workbench.losses import LogitObjective, Objective, logit_loss_on, shift_labels
from workbench.models import forward_for_losses, use_recording_attention
from workbench.sampling import UndrawableProbabilities

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^step-(\d+)$")
HEADS_FILE = "distill_heads.safetensors"


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    interrupted: bool  # stopped by a signal before max_steps (a checkpoint was written)
    metrics: dict  # final metrics ({} when interrupted)


def _region(name: str):
    """A torch.profiler label ("wb/<name>") for one part of the step: what `workbench.bench.profile_kd`
    tabulates; next to nothing when no profiler runs."""
    return torch.profiler.record_function("wb/" + name)


class DistillationModel(nn.Module):
    """The student plus the objective's trainable parts (feature projections): what accelerate prepares,
    so data parallelism and checkpoints cover both. forward() returns summed losses."""

    def __init__(self, student, objective: Objective, rollout: nn.Module | None = None, fused: bool = True):
        super().__init__()
        self.student, self.objective, self.rollout, self.fused = student, objective, rollout, fused

    def state_dict(self, *args, **kwargs):
        """What training changes: trainable parameters and the objective's state. A frozen base (e.g. a
        4-bit one under an adapter) is reloaded from its source, so checkpoints do not carry it."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        keep = {prefix + n for n, p in self.named_parameters(remove_duplicate=False) if p.requires_grad}
        return type(full)((k, v) for k, v in full.items() if k in keep or k.startswith(prefix + "objective."))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        frozen = {n for n, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}
        missing = [k for k in result.missing_keys if k not in frozen]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}")
        return result._replace(missing_keys=missing)  # frozen weights are not missing

    def forward(self, input_ids, rows, teacher=None, rollout: bool = False, position_ids=None):
        # input_ids [B, T]; rows: per-position tensors [B, T] (labels, ...); teacher: ModelOutputs, a dict
        # temperature -> TopKTeacher, or None; position_ids [B, T] or None (packed documents kept apart)
        with _region("student_forward"):
            if rollout:
                out = forward_for_losses(self.student, input_ids, self.fused)
            else:
                out = forward_for_losses(self.student, input_ids, self.fused, self.objective.hidden_layers[0],
                                         self.objective.attention_layers[0], position_ids=position_ids)
        with _region("loss"):  # chunked: the loss's own gradient is formed here, per chunk
            return self.rollout(out, teacher, rows) if rollout else self.objective(out, teacher, rows)


@dataclass
class _Job:
    """One forward/backward of a step: a micro-batch of training data, a GKD-generated micro-batch, or
    MiniLLM rollouts (their own normalising stream)."""

    ids: torch.Tensor  # [B, L]
    rows: dict  # [B, L] tensors
    kind: str  # "data" | "generated" | "rollout"
    blocks: np.ndarray | None = None  # training-block indices (for the teacher cache)
    pos: torch.Tensor | None = None  # [B, L] position ids of packed documents kept apart

    @property
    def stream(self) -> str:
        return "rollout" if self.kind == "rollout" else "data"


@dataclass
class _Rollouts:
    """MiniLLM samples kept for ppo_epochs steps; saved in checkpoints so resume is exact."""

    step: int = -1
    jobs: list = field(default_factory=list)

    def state_dict(self):
        return {"step": self.step, "jobs": [(j.ids.cpu(), {k: v.cpu() for k, v in j.rows.items()}) for j in self.jobs]}

    def load_state_dict(self, state):
        self.step = state["step"]
        self.jobs = [_Job(ids, rows, "rollout") for ids, rows in state["jobs"]]


# --------------------------------------------------------------------------------------------- loop


@dataclass
class TeacherSource:
    """One of several teachers (recipe.teachers): the model (None when trained from its cache), the
    vocabulary the student shares with it (same tokenizer), or its tokenizers (crosstok.CrossTokenizers),
    and its top-k cache (teacher_cache.TeacherCache / CrossCache) or None."""

    model: object = None
    kd_vocab: int | None = None
    cross: object = None
    cache: object = None


def train(recipe: Recipe, accelerator, student, tokenizer, data: PackedData, teacher=None, kd_vocab=None,
          teacher_cache=None, cross=None, teachers: list[TeacherSource] | None = None) -> TrainResult:
    """Train `student` per `recipe.train` / `recipe.distill`; returns after max_steps or a signal.
    `teacher_cache` (a teacher_cache.TeacherCache) replaces the live teacher for logit losses; `cross`
    (a crosstok.CrossTokenizers) makes the teacher read each batch in its own tokens; `teachers`, instead
    of those, several teachers (each loss term names its own)."""
    if teachers is not None and (teacher is not None or teacher_cache is not None or cross is not None):
        raise ValueError("train(): pass several teachers as `teachers` alone")
    cfg, dcfg = recipe.train, recipe.distill
    onp = dcfg.onpolicy
    out = recipe.output_dir
    world = accelerator.num_processes
    accelerator.free_memory()  # forget models/optimizers of an earlier run in this process (a teacher's)
    keep_freed_memory()
    # this run's accumulation (an earlier run in the process, e.g. the teacher's, may have had another)
    accelerator.gradient_accumulation_steps = cfg.grad_accum_steps * dist.backward_passes_per_micro_batch(recipe)
    accelerator.step = 0

    objective = Objective(dcfg.losses, student.config, teacher.config if teacher is not None else None,
                          vocab=kd_vocab if teachers is None else [t.kd_vocab for t in teachers], chunk=dcfg.chunk_size)
    if objective.needs_teacher and teacher is None and teacher_cache is None and not teachers:
        raise ValueError("the recipe's losses need a teacher")
    if dist.zero_stage(accelerator) == 3 and recipe.student.quantized:
        raise RecipeError(f"a {recipe.student.quantize} student cannot be partitioned by ZeRO-3 here; use DDP "
                          "(multi_gpu.yaml) or ZeRO-2 for QLoRA")
    if objective.attention_layers[0]:
        use_recording_attention(student)
        use_recording_attention(teacher)
    if onp.method != "off":  # its samples are prompt_tokens + max_new_tokens long
        from workbench.speculative import check_positions

        check_positions([student, teacher], onp.prompt_tokens + onp.max_new_tokens,
                        f"distill.onpolicy.max_new_tokens={onp.max_new_tokens}",
                        f"samples of prompt_tokens={onp.prompt_tokens} and the new tokens")
    rollout = onpolicy.MiniLLMObjective(onp, kd_vocab, dcfg.chunk_size) if onp.method == "minillm" else None
    model = DistillationModel(student, objective, rollout, dcfg.fused)
    if cfg.gradient_checkpointing:  # non-reentrant: frozen (e.g. 4-bit) inputs still pass gradients to adapters
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        if dist.zero_stage(accelerator) == 3:
            raise RecipeError("train.compile: a ZeRO-3 student gathers its parameters in hooks torch.compile does not "
                              "trace here; compile with DDP, ZeRO-1/2 or one process")
        compile_step(student, objective)
    dist.prepare_deepspeed(accelerator, recipe, student.config.hidden_size)
    optimizer = dist.make_optimizer(_param_groups(model, cfg.weight_decay), cfg, accelerator)
    scheduler = _schedule(optimizer, cfg)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if teacher is not None:
        teacher = dist.place_teacher(teacher, recipe, accelerator)
    for src in teachers or []:
        if src.model is not None:
            src.model = dist.place_teacher(src.model, recipe, accelerator)
    passes = accelerator.gradient_accumulation_steps  # backward passes per optimizer step
    ddp = accelerator.num_processes > 1 and dist.zero_stage(accelerator) == 0 and \
        accelerator.distributed_type.value in ("MULTI_GPU", "MULTI_CPU")
    rollouts = _Rollouts()  # per process; saved beside each checkpoint

    state = {"step": 0, "tokens": 0, "elapsed": 0.0}
    if recipe.resume:
        state = _resume(accelerator, out, rollouts if rollout is not None else None) or state
    metrics = MetricsLog(out, enabled=accelerator.is_main_process, truncate_after=state["step"],
                         tensorboard=recipe.output.tensorboard)
    if state["step"] == 0 and accelerator.is_main_process:
        rundir.write_file(out / "recipe.yaml", recipe.to_yaml())

    student_inner = accelerator.unwrap_model(model).student
    local, total_elems = dist.param_elements(student_inner)
    if state["step"] == 0:
        metrics.write({"step": 0, "parallel/processes": accelerator.num_processes, "parallel/zero_stage":
                       dist.zero_stage(accelerator), "parallel/param_elements_local": local,
                       "parallel/param_elements_total": total_elems})
    teacher_ppl = None
    if teacher is not None and cross is None:  # (a teacher with its own tokens cannot read the student's)
        teacher_ppl = evaluate_perplexity(teacher, data.val, cfg.micro_batch_size, 0, accelerator, dcfg.fused)
        if state["step"] == 0:  # a resumed run logged it already
            metrics.write({"step": 0, "teacher/val_ppl": teacher_ppl})

    def one_teacher(job: _Job, model, cache, tokens):
        if job.kind == "data" and cache is not None:
            if tokens is not None:  # (the alignment is computed again, and checked against the cached one)
                return tokens.teacher_for(None, job.ids, job.pos, job.rows["labels"],
                                          cached=cache.batch(job.blocks, accelerator.device))
            return cache.batch(job.blocks, accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            if job.kind == "rollout":
                return forward_for_losses(model, job.ids, dcfg.fused)
            if tokens is not None:
                return tokens.teacher_for(lambda ids, pos: forward_for_losses(model, ids, dcfg.fused, position_ids=pos),
                                          job.ids, job.pos, job.rows["labels"])
            return forward_for_losses(model, job.ids, dcfg.fused, objective.hidden_layers[1],
                                      objective.attention_layers[1], position_ids=job.pos)

    def teacher_for(job: _Job):
        if teachers is not None:  # several: a list, in the recipe's order
            return [one_teacher(job, t.model, t.cache, t.cross) for t in teachers]
        if job.kind == "data" and teacher_cache is not None:
            return one_teacher(job, teacher, teacher_cache, cross)
        if not (objective.needs_teacher or job.kind == "rollout"):
            return None
        return one_teacher(job, teacher, None, cross)

    stopper = _Stopper()
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=not accelerator.is_main_process,
               desc=recipe.name, dynamic_ncols=True)
    n_train = len(data.train)
    streams = ["data"] + (["rollout"] if rollout is not None else [])  # each normalised by its own tokens
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps * world  # sequences per optimizer step
    run_sums: dict[tuple[str, str], torch.Tensor] = {}  # (stream, name) -> summed loss since last log
    run_tokens: dict[str, torch.Tensor] = {}  # stream -> valid tokens since last log (this process)
    bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # any non-finite loss since last check
    t_last, tokens_last = time.perf_counter(), state["tokens"]
    t_start = time.perf_counter() - state["elapsed"]
    comm_bytes, logged_step = 0, state["step"]
    interrupted = False

    with stopper, bar:  # the bar closed (its line ended) on any way out: an error prints on a line of its own
        while state["step"] < cfg.max_steps:
            step = state["step"]
            jobs = []
            with _region("data"):
                for k in range(cfg.grad_accum_steps):
                    start = step * per_step + (k * world + accelerator.process_index) * cfg.micro_batch_size
                    blocks = stream_indices(n_train, cfg.seed, start, cfg.micro_batch_size)
                    try:
                        jobs += _micro_batch_jobs(blocks, data, onp, cfg.seed, step, k, accelerator, student_inner,
                                                  teacher, tokenizer.eos_token_id, rollouts)
                    except UndrawableProbabilities:  # weights poisoned since the last finiteness check
                        _diverged(f"non-finite probabilities when sampling from the student at step {step}", out)
            counts = {s: torch.zeros((), dtype=torch.float64, device=accelerator.device) for s in streams}
            for j in jobs:
                counts[j.stream] += (j.rows["labels"] != -100).sum()
            n_valid = {s: accelerator.reduce(c, "sum") for s, c in counts.items()}

            model.train()
            if len(jobs) != passes:
                raise RuntimeError(f"{len(jobs)} backward passes in step {step}, accelerate expects {passes}")
            counter = dist.CommBytes() if (ddp and recipe.parallel.comm_hook != "none") else nullcontext()
            with counter:
                for job in jobs:
                    with _region("teacher_forward"):
                        t_out = teacher_for(job)
                    # accumulate(): gradients are synchronised (and DeepSpeed steps) on the last pass only
                    with accelerator.accumulate(model):
                        total, parts = model(job.ids, job.rows, t_out, rollout=job.kind == "rollout",
                                             position_ids=job.pos)
                        # sum / (valid tokens of the step, all processes); x world: DDP/ZeRO average over
                        # processes; x passes: accelerate (and DeepSpeed) divide by the accumulation count
                        scale = world * passes / n_valid[job.stream].clamp(min=1)
                        with _region("backward"):
                            accelerator.backward(total * scale.to(total.dtype))
                    bad |= ~torch.isfinite(total.detach())
                    for name, v in {"loss": total.detach(), **parts}.items():
                        key = (job.stream, name)
                        run_sums[key] = run_sums.get(key, 0) + v.double()
            for s, c in counts.items():
                run_tokens[s] = run_tokens.get(s, 0) + c
            if ddp:  # what DDP sent: counted through the compression hook, or the plain gradient all-reduce
                comm_bytes += counter.bytes if isinstance(counter, dist.CommBytes) else dist.ddp_gradient_bytes(model)

            grad_norm = None
            with _region("optimizer"):
                if cfg.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    if grad_norm is not None:  # an inf/NaN gradient poisons the weights even if the loss was finite
                        bad |= ~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device)).all()
                optimizer.step()
                scheduler.step()  # ours (not one of DeepSpeed's), so never handed to a DeepSpeed engine
                optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            state["tokens"] += per_step * data.seq_len
            bar.update(1)

            last = step == cfg.max_steps
            if step % cfg.log_every == 0 or last:
                _check_finite(bad, accelerator, step, out)
                rec = {"step": step, **_normalised(run_sums, run_tokens, accelerator)}
                now = time.perf_counter()
                rec.update({"lr": scheduler.get_last_lr()[0], "tokens": state["tokens"],
                            "tokens_per_s": (state["tokens"] - tokens_last) / max(now - t_last, 1e-9)})
                if grad_norm is not None:
                    rec["grad_norm"] = float(grad_norm)
                if ddp:
                    rec["parallel/comm_bytes_per_step"] = comm_bytes / (step - logged_step)
                    comm_bytes = 0
                logged_step = step
                metrics.write(rec)
                bar.set_postfix(loss=f"{rec['train/loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                run_sums, run_tokens = {}, {}
                t_last, tokens_last = now, state["tokens"]

            if (cfg.eval_every and step % cfg.eval_every == 0) and not last:
                ppl = evaluate_perplexity(student_inner, data.val, cfg.micro_batch_size, cfg.eval_batches,
                                          accelerator, dcfg.fused)
                metrics.write({"step": step, "val/ppl": ppl})

            stop = stopper.agreed(accelerator, step, cfg.log_every)
            state["elapsed"] = time.perf_counter() - t_start
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (stop and not last):
                _check_finite(bad, accelerator, step, out, student_inner)  # never save a poisoned model
                extra = {f"rollouts_{accelerator.process_index}.pt": rollouts.state_dict()} if rollout else {}
                save_checkpoint(accelerator, out, state, cfg.keep_checkpoints, extra,
                                student_files=(student_inner, tokenizer))
            if stop and not last:
                interrupted = True
                break

    if interrupted:
        log.warning("interrupted at step %d; checkpoint saved in %s; rerun with resume=true", state["step"], out)
        metrics.close()
        return TrainResult(state["step"], True, {})

    _check_finite(bad, accelerator, state["step"], out, student_inner)
    student_ppl = evaluate_perplexity(student_inner, data.val, cfg.micro_batch_size, 0, accelerator, dcfg.fused)
    if not math.isfinite(student_ppl):
        _diverged(f"the validation perplexity after step {state['step']} is {student_ppl}", out, everyone=True)
    final = {
        "recipe": recipe.name,
        "step": state["step"],
        "student_val_ppl": student_ppl,
        "teacher_val_ppl": teacher_ppl,
        "train_tokens": state["tokens"],
        **validation_identity(data),
        "train_seconds": round(state["elapsed"], 1),
        **_peak_memory(accelerator.device),
    }
    metrics.write({"step": state["step"], "val/ppl": student_ppl, "final": True})
    metrics.close()
    save_final_model(accelerator, model, tokenizer, out / "model")
    return TrainResult(state["step"], False, final)


def compile_step(student, objective: Objective) -> None:
    """torch.compile, in place (parameter names, hence checkpoints, unchanged): the student's decoder body
    (its backward compiled with it by AOTAutograd) and each logit loss on a chunk of rows. The output layer
    stays eager: the fused losses take its input through a hook and apply it chunk by chunk, which is the
    loop the per-chunk loss graphs run in."""
    decoder = student.get_decoder()
    decoder.compile(dynamic=False)
    for module in objective._logit_modules:
        module.compile(dynamic=False)


def visited_blocks(cfg, n_train: int, world: int) -> np.ndarray:
    """The training blocks a run of cfg.max_steps steps reads (off-policy), in the order of the loop's
    stream: the micro-batches of all steps, accumulation passes and processes tile [0, steps x per_step)."""
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps * world
    return np.unique(stream_indices(n_train, cfg.seed, 0, cfg.max_steps * per_step))


def _micro_batch_jobs(blocks, data, onp, seed, step, k, accelerator, student, teacher, eos_id, rollouts) -> list[_Job]:
    """The forward passes of one micro-batch: its training blocks, replaced by student samples with
    probability lmbda under GKD, or followed by MiniLLM rollouts."""
    batch = make_batch(data.train, blocks)
    ids = batch["input_ids"].to(accelerator.device)
    pos = batch["position_ids"].to(accelerator.device) if "position_ids" in batch else None
    data_job = _Job(ids, {"labels": mask_labels(shift_labels(ids), batch)}, "data", blocks, pos)
    if onp.method == "off":
        return [data_job]
    if onp.method == "gkd" and not onpolicy.gkd_generates(seed, step, k, onp.lmbda):
        return [data_job]  # the same choice on every process: ZeRO-3 needs them to run the same passes
    prompts = onpolicy.prompts_of(ids, batch.get("target_mask"), onp.prompt_tokens)
    gen = onpolicy.generator_for(seed, step, k, accelerator.process_index, accelerator.device)
    if onp.method == "gkd":
        with accelerator.autocast():
            s = onpolicy.draw(student, prompts, onp, gen, eos_id)
        return [_Job(s.ids, onpolicy.gkd_rows(s), "generated")]
    # minillm: new samples every ppo_epochs steps, from the policy of that step
    first = step - step % onp.ppo_epochs
    if rollouts.step != first:
        rollouts.step, rollouts.jobs = first, []
    if len(rollouts.jobs) <= k:
        with accelerator.autocast():
            s = onpolicy.draw(student, prompts, onp, gen, eos_id, teacher=teacher)
            rows = onpolicy.minillm_rows(student, teacher, s, onp)
        rollouts.jobs.append(_Job(s.ids, rows, "rollout"))
    return [data_job, rollouts.jobs[k]]


def _resume(accelerator, out: Path, rollouts: "_Rollouts | None") -> dict | None:
    """Load the newest checkpoint that loads; a damaged one (a truncated file, say) is reported and the
    next older one is tried. Returns its trainer state, or None when there is no checkpoint."""
    found = checkpoints(out)
    if not found:
        log.info("no checkpoint in %s: starting from scratch", out / "checkpoints")
        return None
    for ckpt in reversed(found):
        try:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            accelerator.load_state(str(ckpt))
            mine = ckpt / f"rollouts_{accelerator.process_index}.pt"
            if rollouts is not None and mine.exists():
                rollouts.load_state_dict(torch.load(mine, weights_only=True))
        except Exception as e:  # whatever the damage, the loaders raise their own error types
            older = [c for c in found if c < ckpt]
            log.warning("checkpoint %s does not load (%s: %s); %s", ckpt, type(e).__name__, str(e).splitlines()[0]
                        if str(e) else "", f"falling back to {older[-1]}" if older else "no older checkpoint")
            continue
        if ckpt != found[-1]:
            log.warning("resumed from %s, the newest checkpoint that loads", ckpt)
        log.info("resumed from %s (step %d)", ckpt, state["step"])
        return state
    raise RecipeError(f"no checkpoint in {out / 'checkpoints'} loads (each is damaged; see the warnings); pass "
                      "output.overwrite=true to start over")


def _normalised(run_sums, run_tokens, accelerator) -> dict[str, float]:
    """Per-token means of every logged term since the last record, over all processes; 'loss' is the
    sum of the streams' normalised totals, as optimised."""
    tokens = {s: accelerator.reduce(t, "sum").clamp(min=1) for s, t in sorted(run_tokens.items())}
    rec, total = {}, 0.0
    for (stream, name), v in sorted(run_sums.items()):
        value = (accelerator.reduce(v, "sum") / tokens[stream]).item()
        if name == "loss":
            total += value
        else:
            rec[f"train/{name}"] = value
    return {"train/loss": total, **rec}


def validation_identity(data: PackedData) -> dict:
    """What the final metrics say of the data: the validation tokens scored, and the keys of the training
    data and of the validation blocks (the report checks that runs it compares saw the same)."""
    targets = getattr(data.val, "targets", None)
    return {"val_tokens": int(targets.sum()) if targets is not None else int(data.val.size), "data_key": data.key,
            "val_key": data.val.fingerprint() if isinstance(data.val, Blocks) else None}


def _check_finite(bad: torch.Tensor, accelerator, step: int, out: Path, model=None) -> None:
    """Stop (on every process alike) when a loss or gradient norm since the last check was non-finite, or,
    with `model`, when one of its trainable weights is: checked before anything is saved."""
    flags = torch.stack([bad, _nonfinite_weights(model, bad.device)]).int()
    loss_bad, weights_bad = accelerator.reduce(flags, "sum").tolist()
    if loss_bad or weights_bad:
        what = "loss or gradient norm" if loss_bad else "weights"
        _diverged(f"non-finite {what} at or before step {step}", out, everyone=True)


def _nonfinite_weights(model, device) -> torch.Tensor:
    """Whether any trainable weight of this process (its partition under ZeRO-3) is inf or NaN."""
    found = torch.zeros((), dtype=torch.bool, device=device)
    if model is not None:
        for p in model.parameters():
            if p.requires_grad:
                local = getattr(p, "ds_tensor", p)  # ZeRO-3: the partition this process holds
                if local.numel():
                    found |= ~torch.isfinite(local.detach()).all().to(device)
    return found


def _diverged(what: str, out: Path, everyone: bool = False) -> None:
    """Raise TrainingDiverged; `everyone`: every process found it (a reduced value)."""
    good = latest_checkpoint(out)
    where = f"the last checkpoint, {good}, is finite" if good else "no checkpoint was saved"
    e = TrainingDiverged(f"{what}: lower train.lr, raise train.warmup_steps, use train.mixed_precision=no, "
                         f"or check the data; nothing non-finite was saved, {where}")
    raise in_every_process(e) if everyone else e


def keep_freed_memory(trim_bytes: int = 1 << 30) -> bool:
    """glibc malloc: serve every allocation under 32 MiB from the heap, and keep up to `trim_bytes` of
    freed heap instead of handing it back to the OS. By default glibc moves its mmap threshold with each
    large free and trims the heap's top whenever it passes twice that, so the memory a step frees
    (activations, loss chunks) was returned and page-faulted in again by the next step: in the vs_trl
    setting 26,000 minor faults and 103 ms per teacher forward in the loop, against 0 and 81 ms without
    them. Process-wide; a no-op (False) without glibc. CUDA memory has its own caching allocator."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, trim_bytes))


def _peak_memory(device) -> dict:
    """Peak memory of this process so far: allocated CUDA memory on a GPU, else the peak resident set
    (which counts everything the process holds: teacher, data, Python)."""
    if device.type == "cuda":
        return {"peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_memory_kind": "cuda allocated"}
    import resource

    return {"peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_memory_kind": "process peak RSS"}


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # no empty groups (e.g. an adapter has no norms): DeepSpeed drops them, leaving the schedule one short
    return [g for g in groups if g["params"]]


def _schedule(optimizer, cfg):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, cfg.warmup_steps, cfg.max_steps, min_lr_rate=cfg.min_lr_ratio
    )


# --------------------------------------------------------------------------------------------- evaluation

_CE = LogitObjective([LossTerm("cross_entropy")])


@torch.no_grad()
def evaluate_perplexity(model, blocks, micro_batch_size: int, max_batches: int, accelerator, fused: bool = True) -> float:
    """exp(mean next-token NLL) over the first `max_batches` validation batches (0: all), the batches
    spread over processes; token-weighted, so equal to one pass over the same blocks. The NLL is
    computed chunk by chunk from the output layer, never holding [B, T, V] logits when `fused`."""
    was_training = model.training
    model.eval()
    n_batches = math.ceil(len(blocks) / micro_batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    world = accelerator.num_processes
    for r in range(math.ceil(n_batches / world)):  # the same number of forwards everywhere (ZeRO-3 gathers)
        b = r * world + accelerator.process_index
        real = b < n_batches
        b = b if real else 0  # a stand-in batch whose result is not counted
        idx = np.arange(b * micro_batch_size, min((b + 1) * micro_batch_size, len(blocks)))
        batch = make_batch(blocks, idx)
        ids = batch["input_ids"].to(accelerator.device)
        pos = batch["position_ids"].to(accelerator.device) if "position_ids" in batch else None
        rows = {"labels": mask_labels(shift_labels(ids), batch)}
        with accelerator.autocast():
            out = forward_for_losses(model, ids, fused, position_ids=pos)
            total, _ = logit_loss_on(_CE, out, None, rows)
        if real:
            nll += total.double()
            count += (rows["labels"] != -100).sum()
    nll, count = accelerator.reduce(nll, "sum"), accelerator.reduce(count, "sum")
    model.train(was_training)
    return math.exp((nll / count.clamp(min=1)).item())


# --------------------------------------------------------------------------------------------- checkpoints


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in a run directory, oldest first."""
    d = Path(out) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def save_checkpoint(accelerator, out: Path, state: dict, keep: int, extra: dict | None = None,
                    student_files=None) -> Path:
    """accelerate.save_state (+ this process's `extra` files, torch.save'd) into step-N.tmp, then
    trainer_state.json, then rename to step-N. `student_files` = (model, tokenizer): their config and
    tokenizer go to step-N/student/, which is what `python -m workbench.consolidate` needs to turn a
    (possibly ZeRO-partitioned) checkpoint into a plain transformers model."""
    final = Path(out) / "checkpoints" / f"step-{state['step']:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    def own_files() -> None:
        dist.save_state(accelerator, tmp)
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)

    def main_files() -> None:
        if accelerator.is_main_process:
            if student_files is not None:
                model, tokenizer = student_files
                getattr(model, "config").save_pretrained(tmp / "student")
                tokenizer.save_pretrained(tmp / "student")
            dist.write_latest(accelerator, tmp)
            (tmp / "trainer_state.json").write_text(json.dumps(state))

    write_part(accelerator, own_files, f"checkpoint {final}", tmp)
    write_part(accelerator, main_files, f"checkpoint {final}", tmp)
    if accelerator.is_main_process:
        rundir.move_into_place(tmp, final)
        for old in checkpoints(out)[:-keep]:
            rundir.remove(old)
    accelerator.wait_for_everyone()
    return final


def write_part(accelerator, write, what: str, tmp: Path) -> None:
    """write() (each process's part of `what`, in the partial directory `tmp`), then every process learns
    whether every process's part was written (this takes the place of a barrier): a process that raised
    alone would leave the others waiting in their next collective. On failure `tmp` is removed and each
    process raises (a full disk: a StorageError naming `what`)."""
    try:
        write()
        mine = None
    except Exception as e:  # (before the partial files are removed: a full disk is recognised by its space)
        mine = e if isinstance(e, StorageError) else storage_error(e, what, into=tmp) or e
        if not accelerator.is_main_process:
            log.error("process %d: %s", accelerator.process_index, mine)
    if _everyone(accelerator, mine is None):
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    if mine is not None:
        raise in_every_process(mine)
    raise in_every_process(StorageError(f"another process could not write its part of {what} (its error is above)"))


def _everyone(accelerator, ok: bool) -> bool:
    """Whether `ok` holds in every process (an all-reduce; a barrier's place in the sequence of collectives)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor(0 if ok else 1, device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() == 0


def save_final_model(accelerator, model, tokenizer, path: Path) -> None:
    """The student as a plain transformers checkpoint (safetensors + config + tokenizer) in `path`, plus
    the trained distillation heads (feature projections), if any, in distill_heads.safetensors. An
    adapted student also gets its adapter in <path>/../adapter (plain peft format) and `path` holds the
    merged model (4-bit weights dequantised, adapter merged)."""
    from safetensors.torch import save_file

    from workbench.models import is_peft, merged_copy

    state_dict = accelerator.get_state_dict(model)
    tmp = path.with_name(path.name + ".tmp")

    def main_files() -> None:  # (the other processes: their part of get_state_dict above)
        if not accelerator.is_main_process:
            return
        student = accelerator.unwrap_model(model).student
        heads = {k[len("objective."):]: v.contiguous() for k, v in state_dict.items() if k.startswith("objective.")}
        shutil.rmtree(tmp, ignore_errors=True)
        weights = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
        if is_peft(student):
            adapter = path.with_name("adapter")
            tmp_adapter = adapter.with_name(adapter.name + ".tmp")
            shutil.rmtree(tmp_adapter, ignore_errors=True)
            with rundir.writing(tmp_adapter, f"the adapter {adapter}"):
                student.save_pretrained(tmp_adapter, state_dict=weights)
                tokenizer.save_pretrained(tmp_adapter)
            rundir.move_into_place(tmp_adapter, adapter)
        with rundir.writing(tmp, f"the model {path}"):
            if is_peft(student):
                merged_copy(student, state_dict=weights).save_pretrained(tmp, safe_serialization=True)
            else:
                student.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if heads:
                save_file(heads, str(tmp / HEADS_FILE))
        rundir.move_into_place(tmp, path)

    write_part(accelerator, main_files, f"the model {path}", tmp)  # every process stops if main cannot write


# --------------------------------------------------------------------------------------------- metrics


class MetricsLog:
    """metrics.jsonl (one JSON object per record) + TensorBoard, main process only. On resume, records
    after the checkpoint's step are dropped so the file reads as one uninterrupted run."""

    def __init__(self, out: Path, enabled: bool, truncate_after: int, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if self.path.exists() and truncate_after > 0:
            keep = [rec for rec in read_metrics(out) if rec["step"] <= truncate_after]
        rundir.write_file(self.path, "".join(json.dumps(rec) + "\n" for rec in keep))  # (the old stay until it is whole)
        self.file = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=truncate_after + 1)

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: named (a line cut short is skipped when the log is read)
            raise storage_error(e, f"the training log {self.path}") or e
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(out: Path) -> list[dict]:
    """The records of <out>/metrics.jsonl. A line that is not a whole record (the write cut short by a
    kill or a full disk) is skipped with a warning."""
    path = Path(out) / "metrics.jsonl"
    records, damaged = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
        elif line.strip():
            damaged += 1
    if damaged:
        log.warning("%s: skipped %d line(s) that are not whole records (a write cut short)", path, damaged)
    return records


# --------------------------------------------------------------------------------------------- signals


class _Stopper:
    """SIGINT/SIGTERM request a clean stop at the end of the current step; a second SIGINT aborts."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: finishing this step and writing a checkpoint (Ctrl-C again to abort)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def agreed(self, accelerator, step: int, every: int) -> bool:
        """All processes must stop at the same step; they compare notes every `every` steps."""
        if accelerator.num_processes == 1:
            return self.requested
        if step % every:
            return False
        flag = torch.tensor(int(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)
