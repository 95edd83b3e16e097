"""Pipeline parallelism with a GPipe schedule, on torch.distributed.pipelining.

`parallel.pipeline_stages: N` splits the student's decoder blocks over N processes (stage 0 also holds the
embedding, the last stage the final norm, the output layer and the loss); `parallel.pipeline_microbatches:
M` splits each step's batch (train.micro_batch_size x train.grad_accum_steps sequences) into M micro-
batches that flow through the stages as GPipe (Huang et al., 2019) schedules them: all forwards, then all
backwards, one synchronous update. The logit objective runs on the last stage, against the teacher held
there (the only process that loads it) or against the top-k cache.

torch's own schedule (torch.distributed.pipelining.ScheduleGPipe over PipelineStage) is used rather than
DeepSpeed's PipelineModule: it takes the transformers blocks as they are (no rewrite into a layer list
with DeepSpeed's loss protocol), runs on gloo for the CPU tests, and leaves the optimizer, schedule and
checkpoints to the same code as every other launch.

Equal to one process: each step's loss is the sum over all micro-batches divided once by the step's valid
tokens, gradients of the tied embedding (stage 0's input table, the last stage's output layer) are summed
over the two stages, and clipping uses the global norm over all stages.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench import distributed as dist
from workbench import trainer as T
from workbench import rundir
from workbench.config import Recipe, RecipeError
from workbench.data import PackedData, make_batch, mask_labels, stream_indices
from workbench.losses import ModelOutputs, Objective, logit_loss_on, shift_labels
from workbench.models import forward_for_losses

log = logging.getLogger(__name__)

_SHARDS = "model-{:05d}-of-{:05d}.safetensors"


def stage_layers(n_layers: int, stages: int, blocks: list[int] | None = None) -> list[range]:
    """The decoder blocks of each stage: contiguous; `blocks` per stage, or as even as the count allows
    (earlier stages get the extra block: the last one also runs the output layer and the loss)."""
    if stages > n_layers:
        raise RecipeError(f"parallel.pipeline_stages: {stages} stages for a student of {n_layers} blocks; each "
                          "stage needs at least one")
    if blocks is not None and sum(blocks) != n_layers:
        raise RecipeError(f"parallel.pipeline_blocks: {list(blocks)} sum to {sum(blocks)}, but the student has "
                          f"{n_layers} blocks")
    counts = blocks or [n_layers // stages + (i < n_layers % stages) for i in range(stages)]
    cuts = np.cumsum([0] + list(counts))
    return [range(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def _decoder(student):
    inner = getattr(student, "model", None)
    parts = [getattr(inner, a, None) for a in ("embed_tokens", "layers", "norm", "rotary_emb")]
    if any(p is None for p in parts) or getattr(student, "lm_head", None) is None:
        raise RecipeError(f"parallel.pipeline_stages: {type(student).__name__} is not a decoder of the Llama layout "
                          "(model.embed_tokens, model.layers, model.norm, model.rotary_emb, lm_head) the stages are cut from")
    return inner


class Stage(nn.Module):
    """One pipeline stage of a Llama-layout causal LM: (embedding,) blocks lo..hi-1 (, final norm). The last
    stage also owns the output layer (`head`), which the loss, not forward(), applies chunk by chunk.

    forward(x): x is [B, T] token ids on the first stage, else [B, T, H] hidden states; returns [B, T, H]
    (normalised on the last stage)."""

    def __init__(self, student, index: int, stages: int, layers: range, autocast=None):
        super().__init__()
        inner = _decoder(student)
        self.index, self.first, self.last = index, index == 0, index == stages - 1
        self.config = student.config
        self.embed = inner.embed_tokens if self.first else None
        self.blocks = nn.ModuleList(inner.layers[i] for i in layers)
        self.rotary = inner.rotary_emb
        self.norm = inner.norm if self.last else None
        self.head = student.lm_head if self.last else None
        self.autocast = autocast
        if self.last and self.first:
            raise ValueError("a pipeline has at least two stages")
        # this stage's parameter names -> the student's (checkpoint shards are plain transformers files)
        prefix = {"embed": "model.embed_tokens", "norm": "model.norm", "head": "lm_head", "rotary": "model.rotary_emb",
                  **{f"blocks.{j}": f"model.layers.{i}" for j, i in enumerate(layers)}}

        def student_name(n: str) -> str:
            parts = n.split(".")
            k = 2 if parts[0] == "blocks" else 1
            return ".".join([prefix[".".join(parts[:k])], *parts[k:]])

        self.names = {n: student_name(n) for n, _ in self.named_parameters(remove_duplicate=False)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        with self.autocast() if self.autocast is not None else torch.autocast("cpu", enabled=False):
            h = self.embed(x) if self.first else x  # [B, T, H]
            pos = torch.arange(h.shape[1], device=h.device)[None]  # [1, T]
            mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None,
                                      past_key_values=None, position_ids=pos)
            rope = self.rotary(h, position_ids=pos)
            for block in self.blocks:
                h = block(h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
            return self.norm(h) if self.last else h

    def tied(self) -> nn.Parameter | None:
        """The embedding matrix this stage holds when input and output layers share it (first: input
        table, last: output layer), else None."""
        if not getattr(self.config, "tie_word_embeddings", False):
            return None
        return self.embed.weight if self.first else (self.head.weight if self.last else None)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """This stage's weights under the student's names; a tied output layer is left to stage 0."""
        out = {}
        for n, p in self.named_parameters(remove_duplicate=False):
            if self.last and self.tied() is not None and n.startswith("head."):
                continue
            out[self.names[n]] = p.detach().contiguous().cpu()
        return out


class _LastStageLoss:
    """The loss the schedule calls on the last stage per micro-batch: (final hidden [b, T, H], target
    [b, 3, T] = token ids, next-token labels, block index in column 0) -> the objective's total divided by
    the step's valid tokens. Records each micro-batch's summed terms for the metrics."""

    def __init__(self, stage: Stage, objective: Objective, teacher, cache, fused: bool, autocast):
        self.stage, self.objective, self.teacher, self.cache = stage, objective, teacher, cache
        self.fused, self.autocast = fused, autocast
        self.scale = 1.0
        self.eval = False  # evaluation: cross-entropy alone
        self.sums: list[torch.Tensor] = []  # per micro-batch: [total, term sums...]

    def __call__(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ids, labels, blocks = target[:, 0], target[:, 1], target[:, 2, 0]
        head = self.stage.head
        out = ModelOutputs(final_hidden=hidden, head_weight=head.weight, head_bias=head.bias)
        rows = {"labels": labels}
        if self.eval:
            total, _ = logit_loss_on(T._CE, out, None, rows)
            self.sums.append(total.detach().reshape(1))
            return total
        teacher = None
        if self.cache is not None:
            teacher = self.cache.batch(blocks.cpu().numpy(), hidden.device)
        elif self.objective.needs_teacher:
            with torch.no_grad(), self.autocast():
                teacher = forward_for_losses(self.teacher, ids, self.fused)
        total, parts = self.objective(out, teacher, rows)
        self.sums.append(torch.stack([total.detach(), *[parts[n] for n in self.objective.names]]).double())
        return total * self.scale


class _Busy:
    """Seconds this stage spends computing (forward and backward of its micro-batches, the loss), read
    from the schedule's calls on the stage; the rest of a step is waiting for the neighbours: the
    pipeline's bubble (and the sends)."""

    def __init__(self, stage, schedule):
        self.seconds = 0.0
        for obj, name in ((stage, "forward_one_chunk"), (stage, "backward_one_chunk"), (schedule, "_maybe_compute_loss")):
            setattr(obj, name, self._timed(getattr(obj, name)))

    def _timed(self, fn):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t
        return run


def check_launch(recipe: Recipe, accelerator) -> None:
    """One process per stage, no DeepSpeed or FSDP underneath."""
    n = recipe.parallel.pipeline_stages
    if accelerator.num_processes != n or not torch.distributed.is_initialized():
        raise RecipeError(f"parallel.pipeline_stages={n}: launch exactly {n} processes, one per stage (e.g. accelerate "
                          f"launch --num_processes {n} --config_file launch_scripts/accelerate/pipeline.yaml); got "
                          f"{accelerator.num_processes}")
    if dist.deepspeed_plugin(accelerator) is not None or accelerator.distributed_type.value == "FSDP":
        raise RecipeError("parallel.pipeline_stages: pipeline stages are not combined with DeepSpeed or FSDP here; "
                          "launch with launch_scripts/accelerate/pipeline.yaml")


def train(recipe: Recipe, accelerator, student, tokenizer, data: PackedData, teacher=None, kd_vocab=None,
          teacher_cache=None):
    """Train `student` split into recipe.parallel.pipeline_stages stages, one per process; returns a
    trainer.TrainResult like trainer.train (metrics on every process)."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    check_launch(recipe, accelerator)
    if getattr(data.train, "positions", None) is not None:
        raise RecipeError("parallel.pipeline_stages: packed documents kept apart (restarting positions) do not pass "
                          "through the stages; set data.separate_documents=false")
    cfg, dcfg, par = recipe.train, recipe.distill, recipe.parallel
    out = recipe.output_dir
    rank, n_stages, device = accelerator.process_index, par.pipeline_stages, accelerator.device
    last_rank = n_stages - 1
    layers = stage_layers(student.config.num_hidden_layers, n_stages, par.pipeline_blocks)
    stage = Stage(student, rank, n_stages, layers[rank], accelerator.autocast).to(device)
    del student  # (the caller still holds the whole model: every stage loads it whole, then trains its share)
    if not stage.last:
        teacher = None
    elif teacher is not None and teacher_cache is None:
        teacher = dist.place_teacher(teacher, recipe, accelerator)
    objective = Objective(dcfg.losses, stage.config, None, vocab=kd_vocab, chunk=dcfg.chunk_size)
    loss = _LastStageLoss(stage, objective, teacher, teacher_cache, dcfg.fused, accelerator.autocast)
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps  # sequences per step (one pipeline, no data parallel)
    M = par.pipeline_microbatches
    # shapes given, not inferred: torch's runtime inference would run the loss (a teacher forward) once more
    # at the first step and again at every switch between training and evaluation
    mb, H = per_step // M, stage.config.hidden_size
    hidden = torch.empty(mb, data.seq_len, H, dtype=next(stage.blocks.parameters()).dtype, device="meta", requires_grad=True)  # (gradients flow back)
    ids_meta = torch.empty(mb, data.seq_len, dtype=torch.long, device="meta")
    pipe = PipelineStage(stage, rank, n_stages, device, input_args=(ids_meta,) if stage.first else (hidden,),
                         output_args=(hidden,))
    # every stage gets the loss: a schedule without one runs forward only (only the last stage calls it)
    schedule = ScheduleGPipe(pipe, M, loss_fn=loss, scale_grads=False)
    busy = _Busy(pipe, schedule)
    tied_group = torch.distributed.new_group([0, last_rank]) if stage.config.tie_word_embeddings else None

    optimizer = dist.make_optimizer(T._param_groups(stage, cfg.weight_decay), cfg, accelerator)
    scheduler = T._schedule(optimizer, cfg)
    state = {"step": 0, "tokens": 0, "elapsed": 0.0}
    if recipe.resume:
        state = _resume(out, rank, stage, optimizer, scheduler) or state
    metrics = T.MetricsLog(out, enabled=accelerator.is_main_process, truncate_after=state["step"],
                           tensorboard=recipe.output.tensorboard)
    if state["step"] == 0 and accelerator.is_main_process:
        rundir.write_file(out / "recipe.yaml", recipe.to_yaml())
        metrics.write({"step": 0, "parallel/processes": n_stages, "parallel/pipeline_stages": n_stages,
                       "parallel/pipeline_microbatches": M,
                       "parallel/stage_blocks": [[r.start, r.stop] for r in layers]})
    teacher_ppl = None
    if teacher is not None and teacher_cache is None:
        teacher_ppl = T.evaluate_perplexity(teacher, data.val, cfg.micro_batch_size, 0,
                                            _Local(device, accelerator.autocast), dcfg.fused)
    teacher_ppl = _from_last(teacher_ppl, last_rank)
    if teacher_ppl is not None and state["step"] == 0:
        metrics.write({"step": 0, "teacher/val_ppl": teacher_ppl})

    def batch_for(blocks):
        batch = make_batch(data.train, blocks)
        ids = batch["input_ids"].to(device)
        labels = mask_labels(shift_labels(ids), batch)
        where = torch.as_tensor(blocks, device=device)[:, None].expand_as(ids)
        return ids, torch.stack([ids, labels, where], dim=1)  # [B, T], [B, 3, T]

    stopper = T._Stopper()
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=not accelerator.is_main_process,
               desc=recipe.name, dynamic_ncols=True)
    n_train = len(data.train)
    run_sums = torch.zeros(1 + len(objective.names), dtype=torch.float64)
    run_tokens = 0.0
    busy_s, wall_s = 0.0, 0.0
    bad = False
    t_last, tokens_last = time.perf_counter(), state["tokens"]
    t_start = time.perf_counter() - state["elapsed"]
    interrupted, logged_step = False, state["step"]
    with stopper:
        while state["step"] < cfg.max_steps:
            step = state["step"]
            blocks = stream_indices(n_train, cfg.seed, step * per_step, per_step)
            ids, target = batch_for(blocks)
            n_valid = (target[:, 1] != -100).sum().clamp(min=1)
            loss.scale, loss.eval, loss.sums = 1.0 / n_valid.double().item(), False, []
            stage.train()
            t0, b0 = time.perf_counter(), busy.seconds
            with T._region("pipeline_step"):
                if stage.first:
                    schedule.step(ids)
                elif stage.last:
                    schedule.step(target=target, losses=[])
                else:
                    schedule.step()
            busy_s += busy.seconds - b0
            wall_s += time.perf_counter() - t0
            if stage.last:
                sums = torch.stack(loss.sums).sum(0).cpu()
                run_sums += sums
                run_tokens += float(n_valid)
                bad |= not bool(torch.isfinite(sums).all())
            _sum_tied_gradients(stage, tied_group)
            grad_norm = _clip(stage, cfg.grad_clip)
            bad |= not math.isfinite(grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            state["tokens"] += per_step * data.seq_len
            bar.update(1)

            last = step == cfg.max_steps
            if step % cfg.log_every == 0 or last:
                T._check_finite(torch.tensor(bad), accelerator, step, out)
                sums = _from_last(torch.cat([run_sums, torch.tensor([run_tokens])]) if stage.last else None, last_rank)
                tokens = max(float(sums[-1]), 1.0)
                fractions = _gather_floats(busy_s / max(wall_s, 1e-9))
                now = time.perf_counter()
                rec = {"step": step, "train/loss": float(sums[0]) / tokens,
                       **{f"train/{n}": float(v) / tokens for n, v in zip(objective.names, sums[1:-1])},
                       "lr": scheduler.get_last_lr()[0], "tokens": state["tokens"],
                       "tokens_per_s": (state["tokens"] - tokens_last) / max(now - t_last, 1e-9), "grad_norm": grad_norm,
                       "parallel/step_seconds": wall_s / (step - logged_step),
                       "parallel/stage_busy_fraction": fractions,
                       "parallel/bubble_fraction": 1.0 - sum(fractions) / len(fractions),
                       "parallel/gpipe_bubble_bound": (n_stages - 1) / (M + n_stages - 1)}
                logged_step = step
                metrics.write(rec)
                bar.set_postfix(loss=f"{rec['train/loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                run_sums.zero_()
                run_tokens, busy_s, wall_s = 0.0, 0.0, 0.0
                t_last, tokens_last = now, state["tokens"]
            if (cfg.eval_every and step % cfg.eval_every == 0) and not last:
                metrics.write({"step": step, "val/ppl": _val_ppl(schedule, stage, loss, data, per_step,
                                                                 cfg.eval_batches * cfg.micro_batch_size, device, last_rank)})
            stop = stopper.agreed(accelerator, step, cfg.log_every)
            state["elapsed"] = time.perf_counter() - t_start
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (stop and not last):
                T._check_finite(torch.tensor(False), accelerator, step, out, stage)  # never save a poisoned model
                extra = {f"stage_{rank}.pt": {"model": stage.state_dict(), "optimizer": optimizer.state_dict(),
                                              "scheduler": scheduler.state_dict()}}
                T.save_checkpoint(accelerator, out, state, cfg.keep_checkpoints, extra, student_files=(stage, tokenizer))
            if stop and not last:
                interrupted = True
                break
    bar.close()
    if interrupted:
        log.warning("interrupted at step %d; checkpoint saved in %s; rerun with resume=true", state["step"], out)
        metrics.close()
        return T.TrainResult(state["step"], True, {})
    T._check_finite(torch.tensor(False), accelerator, state["step"], out, stage)
    student_ppl = _val_ppl(schedule, stage, loss, data, per_step, 0, device, last_rank)
    if not math.isfinite(student_ppl):
        T._diverged(f"the validation perplexity after step {state['step']} is {student_ppl}", out, everyone=True)
    final = {
        "recipe": recipe.name, "step": state["step"], "student_val_ppl": student_ppl, "teacher_val_ppl": teacher_ppl,
        "train_tokens": state["tokens"], **T.validation_identity(data),
        "train_seconds": round(state["elapsed"], 1), "pipeline_stages": n_stages, "pipeline_microbatches": M,
        **T._peak_memory(device),
    }
    metrics.write({"step": state["step"], "val/ppl": student_ppl, "final": True})
    metrics.close()
    save_sharded(stage, tokenizer, out / "model", accelerator)
    return T.TrainResult(state["step"], False, final)


# --------------------------------------------------------------------------------------------- helpers


class _Local:
    """What trainer.evaluate_perplexity needs of an accelerator, for one process alone (the last stage
    measuring its teacher while the other stages wait)."""

    num_processes, process_index = 1, 0

    def __init__(self, device, autocast):
        self.device, self.autocast = device, autocast

    def reduce(self, t, op):
        return t


def _from_last(value, last_rank: int):
    """`value` of the last stage, on every process (any picklable object)."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=last_rank)
    return box[0]


def _gather_floats(x: float) -> list[float]:
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, x)
    return [round(v, 4) for v in out]


def _sum_tied_gradients(stage: Stage, group) -> None:
    """Tied input and output embeddings live on two stages as two copies: their gradients are summed so
    both apply the one update a single process would (the copies start equal and stay equal)."""
    if group is None:
        return
    p = stage.tied()
    if p is None:
        return
    g = p.grad if p.grad is not None else torch.zeros_like(p)
    torch.distributed.all_reduce(g, group=group)
    p.grad = g


def _clip(stage: Stage, max_norm: float) -> float:
    """Clip to the global gradient norm over all stages (the tied matrix counted once, on stage 0), as
    torch.nn.utils.clip_grad_norm_ does for one process; returns the norm."""
    tied = stage.tied() if stage.last else None
    grads = [p.grad for p in stage.parameters() if p.grad is not None and p is not tied]
    local = torch.zeros((), dtype=torch.float64)
    for g in grads:
        local += g.detach().double().pow(2).sum().cpu()
    torch.distributed.all_reduce(local)
    norm = float(local.sqrt())
    if max_norm > 0:
        coef = min(max_norm / (norm + 1e-6), 1.0)
        all_grads = [p.grad for p in stage.parameters() if p.grad is not None]
        if coef < 1.0:
            torch._foreach_mul_(all_grads, coef)
    return norm


@torch.no_grad()
def _val_ppl(schedule, stage: Stage, loss: _LastStageLoss, data, per_step: int, max_blocks: int, device,
             last_rank: int) -> float:
    """Validation perplexity through the pipeline (forward only) on the first `max_blocks` validation blocks
    (0: all; the blocks trainer.evaluate_perplexity reads), in batches of the training step's shape (the
    stages' buffers have it); a short last batch is filled with rows that count for nothing."""
    blocks = data.val
    n = min(len(blocks), max_blocks) if max_blocks else len(blocks)
    n_batches = math.ceil(n / per_step)
    was = stage.training
    stage.eval()
    loss.eval, nll, count = True, 0.0, 0.0
    for b in range(n_batches):
        idx = np.arange(b * per_step, min((b + 1) * per_step, n))
        real = len(idx)
        idx = np.concatenate([idx, np.full(per_step - real, idx[0])])
        batch = make_batch(blocks, idx)
        ids = batch["input_ids"].to(device)
        labels = mask_labels(shift_labels(ids), batch)
        labels[real:] = -100
        target = torch.stack([ids, labels, torch.zeros_like(ids)], dim=1)
        loss.sums = []
        if stage.first:
            schedule.eval(ids)
        elif stage.last:
            schedule.eval(target=target, losses=[])
            nll += float(torch.cat(loss.sums).sum())
            count += float((labels != -100).sum())
        else:
            schedule.eval()
    loss.eval = False
    stage.train(was)
    nll, count = _from_last((nll, count) if stage.last else None, last_rank)
    return math.exp(nll / max(count, 1.0))


def save_sharded(stage: Stage, tokenizer, path: Path, accelerator) -> None:
    """The trained student as one plain transformers checkpoint in `path`: each stage writes its shard of
    the weights, the main process the index (model.safetensors.index.json), config and tokenizer; written
    in path.tmp and renamed into place when complete."""
    import shutil

    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    world = accelerator.num_processes
    tensors = stage.checkpoint_tensors()
    shard = _SHARDS.format(stage.index + 1, world)
    what = f"the model {path}"
    T.write_part(accelerator, lambda: save_file(tensors, str(tmp / shard), metadata={"format": "pt"}), what, tmp)
    names = [None] * world
    torch.distributed.all_gather_object(names, (shard, {k: v.numel() * v.element_size() for k, v in tensors.items()}))

    def main_files() -> None:
        if accelerator.is_main_process:
            index = {"metadata": {"total_size": sum(sum(s.values()) for _, s in names)},
                     "weight_map": {k: f for f, s in names for k in sorted(s)}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            stage.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

    T.write_part(accelerator, main_files, what, tmp)
    if accelerator.is_main_process:
        rundir.move_into_place(tmp, path)
    accelerator.wait_for_everyone()


def _resume(out: Path, rank: int, stage: Stage, optimizer, scheduler) -> dict | None:
    """The newest checkpoint whose files for this stage load (every stage agrees on the same one)."""
    found = T.checkpoints(out)
    ok = []
    for ckpt in found:
        try:
            torch.load(ckpt / f"stage_{rank}.pt", map_location="cpu", weights_only=True)
            json.loads((ckpt / "trainer_state.json").read_text())
            ok.append(1.0)
        except Exception:  # a damaged or missing file: this checkpoint is not used by any stage
            ok.append(0.0)
    if found:
        everywhere = torch.tensor(ok, dtype=torch.float64)
        torch.distributed.all_reduce(everywhere, op=torch.distributed.ReduceOp.MIN)
        usable = [c for c, good in zip(found, everywhere.tolist()) if good]
    else:
        usable = []
    if not usable:
        if found:
            raise RecipeError(f"no checkpoint in {out / 'checkpoints'} loads on every stage; pass output.overwrite=true "
                              "to start over")
        log.info("no checkpoint in %s: starting from scratch", out / "checkpoints")
        return None
    ckpt = usable[-1]
    saved = torch.load(ckpt / f"stage_{rank}.pt", map_location="cpu", weights_only=True)
    stage.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if ckpt != found[-1]:
        log.warning("resumed from %s, the newest checkpoint that loads on every stage", ckpt)
    log.info("resumed from %s", ckpt)
    return json.loads((ckpt / "trainer_state.json").read_text())
