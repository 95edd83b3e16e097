"""Multi-process training on accelerate: the Accelerator for a recipe, DeepSpeed configs whose "auto"
values are filled from the recipe, the optimizer ZeRO-Offload wants, teacher placement (replicated or a
ZeRO-3 inference engine), DDP gradient-compression hooks, and what each process holds and sends.

Launch configs live in launch_scripts/accelerate/*.yaml (+ launch_scripts/deepspeed/*.json); nothing
here is a distributed layer of our own.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path

import torch

from workbench.config import Recipe, RecipeError

log = logging.getLogger(__name__)


def backward_passes_per_micro_batch(recipe: Recipe) -> int:
    """MiniLLM runs two forward/backward passes per micro-batch (data + rollouts)."""
    return 2 if recipe.distill.onpolicy.method == "minillm" else 1


def make_accelerator(recipe: Recipe):
    """The Accelerator for `recipe` under whatever `accelerate launch` configured (single process, DDP,
    DeepSpeed, FSDP). Gradient accumulation is counted in backward passes, so accelerate (and DeepSpeed)
    step the optimizer exactly once per recipe step."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = []
    cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    if cpu_processes:  # processes started by torchrun on a machine without GPUs: CPU data parallel over gloo
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    hook = recipe.parallel.comm_hook
    if hook == "bf16" and not torch.cuda.is_available():
        raise RecipeError("parallel.comm_hook=bf16: torch's bf16 compression hook needs NCCL (GPUs); use fp16 here")
    if hook != "none":
        from accelerate.utils import DDPCommunicationHookType

        kind = {"fp16": DDPCommunicationHookType.FP16, "bf16": DDPCommunicationHookType.BF16,
                "powersgd": DDPCommunicationHookType.POWER_SGD,
                "batched_powersgd": DDPCommunicationHookType.BATCHED_POWER_SGD}[hook]
        state = {}
        if "powersgd" in hook:
            state = {"matrix_approximation_rank": recipe.parallel.powersgd_rank,
                     "start_powerSGD_iter": max(2, recipe.parallel.powersgd_warmup_steps)}
        extra = {}
        if "powersgd" in hook and cpu_processes:
            # PowerSGD chains its all-reduces through future callbacks, which gloo runs on its own threads
            # while DDP hands the next bucket to the hook from the main thread: with several buckets the
            # processes issue the collectives in different orders (a size mismatch, then an abort). One
            # bucket leaves nothing to interleave. (NCCL completes futures in issue order: GPUs keep the
            # default bucketing.)
            extra["bucket_cap_mb"] = 1 << 16
        handlers.append(DistributedDataParallelKwargs(comm_hook=kind, comm_state_option=state, **extra))
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.grad_accum_steps * backward_passes_per_micro_batch(recipe),
        step_scheduler_with_optimizer=False,  # our schedule counts optimizer steps, not samples
        kwargs_handlers=handlers,
        # without GPUs accelerate recognises torchrun's processes as CPU data parallel only when told;
        # DeepSpeed finds its processes itself
        cpu=cpu_processes and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true",
    )
    if hook != "none" and accelerator.distributed_type.value not in ("MULTI_GPU", "MULTI_CPU"):
        log.warning("parallel.comm_hook=%s applies to DDP only; ignored under %s", hook, accelerator.distributed_type)
    return accelerator


# --------------------------------------------------------------------------------------------- DeepSpeed


def deepspeed_plugin(accelerator):
    return getattr(accelerator.state, "deepspeed_plugin", None)


def zero_stage(accelerator) -> int:
    plugin = deepspeed_plugin(accelerator)
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) if plugin else 0


def fill_deepspeed_config(config: dict, recipe: Recipe, hidden_size: int, world: int) -> dict:
    """Replace every "auto" in a DeepSpeed config with the value the recipe implies (in place), and check
    that explicit values agree with the recipe."""
    t = recipe.train
    gas = t.grad_accum_steps * backward_passes_per_micro_batch(recipe)
    wanted = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": t.micro_batch_size * gas * world,
        "gradient_clipping": t.grad_clip,
        "bf16.enabled": t.mixed_precision == "bf16",
        "fp16.enabled": t.mixed_precision == "fp16",
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for dotted, value in wanted.items():
        *parents, key = dotted.split(".")
        node = config
        for p in parents:
            node = node.setdefault(p, {})
        if node.get(key, "auto") == "auto":
            node[key] = value
        elif dotted in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size") \
                and node[key] != value:
            raise RecipeError(f"DeepSpeed config {dotted}={node[key]} but the recipe implies {value}; "
                              "set it to \"auto\"")
    if not torch.cuda.is_available() and config.get("zero_force_ds_cpu_optimizer", "auto") == "auto":
        config["zero_force_ds_cpu_optimizer"] = False  # see make_optimizer
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise RecipeError(f"DeepSpeed config has an '{section}' section; the recipe owns the "
                              f"{section} (train.*): remove it")
    return config


def prepare_deepspeed(accelerator, recipe: Recipe, hidden_size: int) -> None:
    """Fill the launch's DeepSpeed config from the recipe before accelerate.prepare()."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return
    # keep the launch's config with its "auto"s: a later run in this process (after a teacher's) refills it
    template = getattr(plugin, "_workbench_template", None)
    if template is None:
        template = plugin._workbench_template = copy.deepcopy(plugin.deepspeed_config)
    plugin.deepspeed_config.clear()
    plugin.deepspeed_config.update(copy.deepcopy(template))
    fill_deepspeed_config(plugin.deepspeed_config, recipe, hidden_size, accelerator.num_processes)
    if accelerator.is_main_process:
        import json

        recipe.output_dir.mkdir(parents=True, exist_ok=True)
        (recipe.output_dir / "deepspeed_config.json").write_text(json.dumps(plugin.deepspeed_config, indent=2))


@contextlib.contextmanager
def unpartitioned_loading():
    """Load a model whole even under a ZeRO-3 launch: transformers partitions every model created while
    accelerate's DeepSpeed config is registered, which a replicated teacher must not be."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def save_state(accelerator, path) -> None:
    """accelerator.save_state(path), with DeepSpeed's writes made safe to fail in one process alone.

    DeepSpeed's save_checkpoint writes between barriers of its own: a write that raised in one process
    (its disk full) took that process out of save_checkpoint while the others waited at the next barrier,
    forever. Here its writes (the engine's checkpoint files and directories, the recovery scripts) record a
    failure instead of raising, so every process passes the same barriers, and the first failure is raised
    once save_state returns (trainer.write_part then tells every process). DeepSpeed's one other write, the
    `latest` file naming the tag, is left to the main process afterwards: `write_latest`."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        accelerator.save_state(str(path))
        return
    engine, failed = wrapped.engine, []

    def recorded(write):
        def call(*args, **kwargs):
            try:
                return write(*args, **kwargs)
            except Exception as e:  # any failure: raised below, after DeepSpeed's barriers
                failed.append(e)
        return call

    owners = [(engine.checkpoint_engine, "save"), (engine.checkpoint_engine, "makedirs"),
              (engine, "_copy_recovery_script")]
    own = [vars(obj).get(name, _UNSET) for obj, name in owners]
    for obj, name in owners:
        setattr(obj, name, recorded(getattr(obj, name)))
    try:
        accelerator.save_state(str(path), save_latest=False)
    finally:
        for (obj, name), before in zip(owners, own):
            if before is _UNSET:
                delattr(obj, name)
            else:
                setattr(obj, name, before)
    if failed:
        raise failed[0]


def write_latest(accelerator, path) -> None:
    """The `latest` file DeepSpeed's own tools (zero_to_fp32.py without --tag) read the tag from, in a
    checkpoint `save_state` wrote under DeepSpeed (main process; nothing otherwise)."""
    if getattr(accelerator, "deepspeed_engine_wrapped", None) is not None and accelerator.is_main_process:
        from accelerate.utils import MODEL_NAME  # the tag accelerate gives its (first) DeepSpeed engine

        (Path(path) / "latest").write_text(MODEL_NAME)


_UNSET = object()


def offloads_optimizer(accelerator) -> bool:
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return False
    device = plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def make_optimizer(param_groups, cfg, accelerator):
    """AdamW; DeepSpeedCPUAdam (the same update, vectorised on the CPU) when ZeRO offloads the optimizer
    of GPU processes. On machines without GPUs, DeepSpeed's offload path with DeepSpeedCPUAdam does not
    reproduce a single-process run (measured with 2 gloo processes, DeepSpeed 0.19.8: the first update
    already differs, while DeepSpeedCPUAdam alone matches torch's AdamW), so CPU processes keep torch's
    AdamW on the offloaded fp32 partitions, which matches exactly. Fused where the parameters allow it."""
    if offloads_optimizer(accelerator) and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), adamw_mode=True)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=_can_fuse_adamw(param_groups))


def _can_fuse_adamw(param_groups) -> bool:
    """torch's fused AdamW (one kernel over all tensors; what transformers' Trainer uses by default) where
    it applies: floating-point parameters on the CPU or a CUDA device. Under the profiler on 2 CPU cores the
    `vs_trl` student's unfused update took 7.7 ms a step, TRL's fused one 2.9 ms; the update is the same
    formula to float rounding (tests compare it)."""
    params = [p for g in param_groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def place_teacher(teacher, recipe: Recipe, accelerator):
    """The frozen teacher where the recipe wants it: 'replicated' on every process (in its own dtype, NF4
    included), or 'zero3' / 'zero3_offload': a DeepSpeed ZeRO-3 inference engine whose parameters are
    partitioned over the processes (and kept on the CPU with offload). Returns what to call."""
    teacher.requires_grad_(False)
    teacher.eval()
    placement = recipe.parallel.teacher
    if placement == "replicated":
        if not getattr(teacher, "is_loaded_in_4bit", False):
            teacher.to(accelerator.device)
        return teacher
    import deepspeed

    if accelerator.num_processes > 1 and deepspeed_plugin(accelerator) is None and not torch.distributed.is_initialized():
        raise RecipeError("parallel.teacher=zero3 needs torch.distributed (launch with accelerate)")
    config = {
        "train_micro_batch_size_per_gpu": recipe.train.micro_batch_size,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10 * teacher.config.hidden_size,
                              "stage3_prefetch_bucket_size": int(0.9 * teacher.config.hidden_size ** 2)},
        "bf16": {"enabled": recipe.train.mixed_precision == "bf16"},
        "fp16": {"enabled": recipe.train.mixed_precision == "fp16"},
    }
    if placement == "zero3_offload":
        config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    engine, *_ = deepspeed.initialize(model=teacher, config=copy.deepcopy(config))
    engine.eval()
    return engine.module  # ZeRO-3 hooks on the module gather each layer's weights as it runs


# --------------------------------------------------------------------------------------------- accounting


def param_elements(model) -> tuple[int, int]:
    """(elements this process holds, elements of the full model): ZeRO-3 partitions, others replicate."""
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):
            total += p.ds_numel
            local += p.ds_tensor.numel() if getattr(p, "ds_tensor", None) is not None else 0
        else:
            total += p.numel()
            local += p.numel()
    return local, total


class CommBytes:
    """Counts the bytes handed to torch.distributed all-reduce / all-gather calls made from Python (DDP
    communication hooks make theirs there) while active."""

    def __init__(self):
        self.bytes = 0
        self._saved = {}

    def __enter__(self):
        import torch.distributed as dist

        for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
            real = getattr(dist, name, None)
            if real is None:
                continue
            self._saved[name] = real

            def counted(*args, _real=real, _name=name, **kwargs):
                tensors = [a for a in args if isinstance(a, torch.Tensor)][:1] if _name == "all_reduce" else \
                    [a for a in args[1:2] if isinstance(a, torch.Tensor)]
                self.bytes += sum(t.numel() * t.element_size() for t in tensors)
                return _real(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, real in self._saved.items():
            setattr(dist, name, real)


def ddp_gradient_bytes(model) -> int:
    """Bytes one uncompressed DDP all-reduce of the trainable gradients sends (per process, per step)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
