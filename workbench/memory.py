"""Memory estimator: expected per-GPU and CPU memory of a recipe under a launch config, without loading
weights.

    python -m workbench.memory recipe=kd_13b_to_7b launch=zero3_offload gpus=8 [nodes=1] [key=value ...]

launch: single | ddp | zero2 | zero3 | zero3_offload | zero3_nvme | zero3_pp | fsdp2 (the configs in
launch_scripts/accelerate/). Under ZeRO-3 and ZeRO++ (zero3_pp) it also prints the bytes each GPU
communicates per step for the student (see `communication`) and, for zero3_pp, what ZeRO++ saves.
Parameter counts come from the models' configs (instantiated on the meta device); Hub configs must be
cached or reachable, and Llama-2 7B/13B/70B are known offline.

Model states follow the ZeRO paper's accounting (mixed precision Adam: 2 + 2 + 12 bytes per trainable
parameter, partitioned by stage); under ZeRO-3 as DeepSpeed's estimate_zero3_model_states_mem_needs counts
them: fp32 gradient partitions (18 bytes per parameter), the largest layer gathered whole, and with CPU
offload DeepSpeed's 1.5x buffer factor on the host (tests compare the two). Activations are counted like Korthikanti et al., with the constant for
our Llama blocks (SwiGLU MLP, RMSNorm, SDPA attention, which keeps no s x s scores): 11 + 4 i/h values
per token and hidden unit per layer (measured: the bytes autograd saves in our tiny Llamas), plus
2.5 a s^2 b values per layer with eager attention (attention losses); gradient checkpointing keeps only
each layer's input plus one layer in flight. Logits follow our chunked loss.
It is an estimate: allocator caching, fragmentation and CUDA context (about 0.5-1 GiB) come on top.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from workbench.config import ModelSpec, Recipe, RecipeError, folded, interruptible, load_recipe  # noqa: E402

LAUNCHES = ("single", "ddp", "zero2", "zero3", "zero3_offload", "zero3_nvme", "zero3_pp", "fsdp2")
ZERO3_LAUNCHES = ("zero3", "zero3_offload", "zero3_nvme", "zero3_pp")  # DeepSpeed ZeRO-3: `communication` applies
REPO = Path(__file__).resolve().parent.parent
GIB = 2**30

# Llama-2 configs (public, Apache/Llama-2 license metadata), so the headline recipes estimate offline.
KNOWN = {
    "meta-llama/Llama-2-7b-hf": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "meta-llama/Llama-2-13b-hf": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "meta-llama/Llama-2-70b-hf": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
}


@dataclass
class ModelShape:
    params: int  # all parameters
    linear: int  # parameters in linear layers of the blocks (what NF4 quantises)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    largest_layer: int = 0  # parameters of the largest module (what ZeRO-3 gathers at once)


def model_shape(spec: ModelSpec, vocab: int) -> ModelShape:
    """Sizes of the model a spec names, from its config on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from workbench.models import _TINY_COMMON, TINY_CONFIGS

    if spec.tiny:
        config = LlamaConfig(**{**_TINY_COMMON, **TINY_CONFIGS[spec.tiny], **spec.config}, vocab_size=vocab)
    elif spec.name_or_path in KNOWN:
        config = LlamaConfig(**KNOWN[spec.name_or_path])
    elif spec.recipe:
        dep = load_recipe(spec.recipe)
        return model_shape(dep.student, vocab if dep.data.tokenizer == "auto" else dep.data.vocab_size)
    else:
        from workbench.models import resolve_source

        try:
            config = AutoConfig.from_pretrained(resolve_source(spec.name_or_path), revision=spec.revision)
        except Exception as e:
            raise RecipeError(f"cannot read the config of '{spec.name_or_path}' ({folded(e)}); give a local path") from e
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out_layer = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m is not out_layer)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ModelShape(params=sum(p.numel() for p in model.parameters()), linear=linear, hidden=config.hidden_size,
                      largest_layer=largest,
                      intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
                      layers=config.num_hidden_layers, heads=config.num_attention_heads, vocab=config.vocab_size)


def _weight_bytes(shape: ModelShape, spec: ModelSpec, bits16: bool) -> float:
    """Bytes of a model's weights as held on the device."""
    unquantised = 2 if bits16 or spec.dtype != "float32" else 4  # bytes a weight bitsandbytes leaves alone
    if spec.quantize == "nf4":
        nf4 = shape.linear * (0.5 + (1 / 64 if spec.quant.double_quant else 4 / 64))
        other = (shape.params - shape.linear) * (4 if spec.quant.compute_dtype == "float32" else 2)
        return nf4 + other
    if spec.quantize == "int8":  # one byte a weight, a 4-byte scale per output row (rows ~ linear / hidden)
        int8 = shape.linear * (1 + 4 / shape.hidden)
        return int8 + (shape.params - shape.linear) * unquantised
    return shape.params * unquantised


def _adapter_params(shape: ModelShape, spec: ModelSpec) -> int:
    if spec.adapter.method == "none":
        return shape.params
    # LoRA-like: r * (in + out) per adapted linear layer; all-linear ~ 7 layers of width ~hidden per block
    return int(spec.adapter.r * 2 * shape.hidden * 7 * shape.layers * 1.4)


def estimate(recipe: Recipe, launch: str = "single", gpus: int = 1, nodes: int = 1) -> dict[str, dict[str, float]]:
    """{"gpu": {component: bytes}, "cpu": {component: bytes}} per GPU / per node."""
    if launch not in LAUNCHES:
        raise RecipeError(f"launch: '{launch}' is not one of {list(LAUNCHES)}")
    world = gpus * nodes
    t = recipe.train
    vocab = recipe.data.vocab_size
    s = model_shape(recipe.student, vocab)
    bits16 = t.mixed_precision in ("bf16", "fp16")
    zero = {"zero2": 2, "zero3": 3, "zero3_offload": 3, "zero3_nvme": 3, "zero3_pp": 3, "fsdp2": 3}.get(launch, 0)
    shard = world if zero else 1
    trainable = _adapter_params(s, recipe.student)
    ds16 = bits16 and launch.startswith("zero")  # DeepSpeed keeps 16-bit params + an fp32 master copy
    weights = _weight_bytes(s, recipe.student, ds16)
    if recipe.student.adapter.method != "none":
        weights += trainable * 4
    grads = trainable * (2 if ds16 else 4)
    optimizer = trainable * (8 + (4 if ds16 else 0))  # Adam m, v (+ fp32 master)
    if zero == 3 and ds16:
        # as DeepSpeed accounts ZeRO-3 (estimate_zero3_model_states_mem_needs): per parameter 2 bytes of 16-bit
        # weights, 4 of fp32 gradients (the optimizer's partition) and 12 of Adam (fp32 master, m, v) = 18,
        # plus the largest layer gathered whole (4 bytes per parameter: 16-bit weights and gradients)
        grads = trainable * 4
    gpu = {"student weights": weights / (shard if zero >= 3 else 1),
           "gradients": grads / (shard if zero >= 2 else 1),
           "optimizer states": optimizer / shard if zero else optimizer}
    if zero == 3:
        gpu["gathered largest layer"] = 4.0 * s.largest_layer
    if launch == "zero3_pp":  # hpZ: a secondary copy of the 16-bit weights, partitioned within each group
        gpu["hpZ secondary weight partition"] = s.params * (2 if bits16 else 4) / min(hpz_partition_size(), world)
    cpu = {}
    if launch in ("zero3_offload", "zero3_nvme"):
        per_node = gpus / world  # a node holds the partitions of its own processes
        if launch == "zero3_offload":
            cpu["student weights (offloaded)"] = weights * per_node
            cpu["gradients (offloaded, fp32)"] = trainable * 4 * per_node
            cpu["optimizer states (offloaded)"] = optimizer * per_node
            # DeepSpeed's additional_buffer_factor (1.5): pinned transfer buffers and fragmentation
            cpu["offload buffers (DeepSpeed's x1.5)"] = 0.5 * sum(cpu.values())
        else:
            cpu["optimizer buffers (NVMe-backed)"] = optimizer * per_node * 0.1
            cpu["student weights (offloaded)"] = weights * per_node
        gpu["optimizer states"] = 0.0
        gpu["student weights"] = 0.0
        gpu["gradients"] = 0.0
    # activations: batch x sequence through every layer
    b, seq, h, L, a = t.micro_batch_size, recipe.data.seq_len, s.hidden, s.layers, s.heads
    act_bytes = 2 if bits16 else 4
    eager = any(x.name.startswith("attention_") for x in recipe.distill.losses)
    per_layer = seq * b * h * (11 + 4 * s.intermediate / h) * act_bytes + (2.5 * a * seq * seq * b * act_bytes if eager else 0)
    if t.gradient_checkpointing:  # layer inputs kept; one layer's activations rebuilt at a time
        gpu["activations"] = L * seq * b * h * act_bytes
        gpu["recomputed layer"] = per_layer
    else:
        gpu["activations"] = L * per_layer
    # logits: chunks of [tokens, vocab] fp32 for student and teacher, plus the final hidden states
    from workbench.losses import auto_chunk

    fused = recipe.distill.fused and not zero >= 3
    chunk = recipe.distill.chunk_size or auto_chunk(s.vocab, s.hidden if fused else 0)
    tokens = b * seq
    gpu["logits"] = (min(chunk, tokens) * s.vocab * 4 * 6 if fused else tokens * s.vocab * (act_bytes + 4 * 3))
    specs = [] if recipe.distill.teacher_cache.top_k else recipe.teacher_specs
    for i, spec in enumerate(specs):  # each teacher (several: teachers.i)
        name = "teacher" if len(specs) == 1 else f"teachers.{i}"
        ts = model_shape(spec, vocab)
        tw = _weight_bytes(ts, spec, bits16 or spec.dtype != "float32")
        place = recipe.parallel.teacher
        gpu[f"{name} weights"] = tw if place == "replicated" else (tw / world if place == "zero3" else 0.0)
        if place == "zero3_offload":
            cpu[f"{name} weights (offloaded)"] = tw * gpus / world
        gpu[f"{name} activations"] = seq * b * ts.hidden * act_bytes * 4 + (0 if fused else tokens * ts.vocab * act_bytes)
        if not spec.quantized:  # loaded whole on the CPU by every process, then moved
            cpu[f"{name} loading (per process)"] = tw * gpus
    if not (launch.startswith("zero3") or launch == "fsdp2") or recipe.student.name_or_path or recipe.student.recipe:
        cpu["loading (one fp32 copy per process)"] = s.params * 4 * gpus
    return {"gpu": gpu, "cpu": cpu}


def hpz_partition_size(path: Path | None = None) -> int:
    """zero_hpz_partition_size (GPUs sharing a secondary partition) of launch_scripts/deepspeed/zero3_pp.json."""
    import json

    path = path or REPO / "launch_scripts" / "deepspeed" / "zero3_pp.json"
    if not path.is_file():  # e.g. workbench installed from a wheel: the launch configs live in the checkout
        raise ValueError(f"{path} not found: the launch configs are in the repository's launch_scripts/ "
                         "(run from a clone of it)")
    return int(json.loads(path.read_text())["zero_optimization"].get("zero_hpz_partition_size", 1))


def communication(recipe: Recipe, launch: str, gpus: int = 1, nodes: int = 1,
                  hpz: int | None = None) -> dict[str, dict[str, float]]:
    """Bytes one GPU sends per optimizer step for the student's ZeRO-3 collectives, {collective: {"total":
    bytes, "inter-node": bytes of collectives whose group spans nodes}}, as the ZeRO++ paper (Wang et al.,
    2023) accounts them: with P parameters (T trainable) over N = gpus x nodes processes, every micro-batch
    all-gathers the 16-bit weights for the forward and again for the backward, and reduce-scatters the 16-bit
    gradients: ring collectives, (N-1)/N of the full tensor each. ZeRO++ (zero3_pp): qwZ all-gathers int8
    weights for the forward (1 byte a weight plus a scale per group of about 8,000); hpZ gathers the
    backward's weights from a secondary partition within groups of `hpz` GPUs (inside a node when hpz divides
    gpus, so none of it crosses nodes); qgZ replaces the reduce-scatter by two all-to-alls of int4 gradients:
    within the node (each GPU sends (g-1)/g of the tensor), then across nodes among the GPUs of the same local
    rank, of the 1/g slice each reduced locally ((n-1)/n of it). "inter-node" counts the bytes of the
    collectives whose group spans nodes (as the paper does; how much of a ring's traffic uses the slower links
    depends on its order). Only the student is counted: a teacher under parallel.teacher=zero3 adds its
    forward all-gathers."""
    if launch not in ZERO3_LAUNCHES:
        raise RecipeError(f"communication: launch '{launch}' is not a ZeRO-3 launch")
    N, g, n = gpus * nodes, gpus, nodes
    s = model_shape(recipe.student, recipe.data.vocab_size)
    P, T = s.params, _adapter_params(s, recipe.student)
    w16 = 2 if recipe.train.mixed_precision in ("bf16", "fp16") else 4  # bytes of a gathered weight / gradient
    micro = recipe.train.grad_accum_steps
    out_share = 1.0 if n > 1 else 0.0  # a collective over all N GPUs spans the nodes

    def ring(nbytes):
        total = nbytes * (N - 1) / N
        return {"total": micro * total, "inter-node": micro * total * out_share}

    if launch != "zero3_pp":
        return {"forward all-gather (16-bit weights)": ring(P * w16),
                "backward all-gather (16-bit weights)": ring(P * w16),
                "gradient reduce-scatter (16-bit)": ring(T * w16)}
    hpz = hpz or hpz_partition_size()
    h = min(hpz, N)
    inside = g % h == 0  # secondary groups do not straddle nodes
    bwd = P * w16 * (h - 1) / h
    intra = T * 0.5 * (g - 1) / g
    inter = T * 0.5 / g * (n - 1) / n
    return {"forward all-gather (qwZ: int8 weights)": ring(P * (1 + 4 / 8000)),
            "backward all-gather (hpZ: within groups of %d)" % h: {
                "total": micro * bwd, "inter-node": 0.0 if inside else micro * bwd * out_share},
            "gradient all-to-all (qgZ: int4, in the node then across)": {
                "total": micro * (intra + inter), "inter-node": micro * inter}}


def communication_totals(comm: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"total": bytes, "inter-node": bytes} summed over the collectives `communication` returns."""
    return {key: sum(v[key] for v in comm.values()) for key in ("total", "inter-node")}


def format_communication(recipe: Recipe, launch: str, gpus: int, nodes: int) -> str:
    """The table `communication` returns, and against plain ZeRO-3 for zero3_pp."""
    comm = communication(recipe, launch, gpus, nodes)
    lines = [f"communication per GPU per optimizer step ({recipe.train.grad_accum_steps} micro-batches), student:",
             f"  {'collective':58s} {'total':>10s} {'inter-node':>11s}"]
    for k, v in comm.items():
        lines.append(f"  {k:58s} {v['total'] / GIB:7.2f} GiB {v['inter-node'] / GIB:7.2f} GiB")
    tot = communication_totals(comm)
    lines.append(f"  {'total':58s} {tot['total'] / GIB:7.2f} GiB {tot['inter-node'] / GIB:7.2f} GiB")
    if launch == "zero3_pp":
        ref = communication_totals(communication(recipe, "zero3", gpus, nodes))
        saved = "  ZeRO++ vs ZeRO-3: saves %.2f GiB per GPU per step (%.2fx less)" % (
            (ref["total"] - tot["total"]) / GIB, ref["total"] / tot["total"])
        if ref["inter-node"]:
            saved += "; between nodes %.2f GiB less (%.2fx)" % (
                (ref["inter-node"] - tot["inter-node"]) / GIB, ref["inter-node"] / max(tot["inter-node"], 1e-9))
        lines.append(saved)
    return "\n".join(lines)


def format_estimate(est: dict, recipe: Recipe, launch: str, gpus: int, nodes: int) -> str:
    lines = [f"{recipe.name} under {launch} on {nodes} node(s) x {gpus} GPU(s)", "", "per GPU:"]
    for k, v in est["gpu"].items():
        lines.append(f"  {k:38s} {v / GIB:9.2f} GiB")
    lines.append(f"  {'total':38s} {sum(est['gpu'].values()) / GIB:9.2f} GiB")
    lines.append("CPU per node:")
    for k, v in est["cpu"].items():
        lines.append(f"  {k:38s} {v / GIB:9.2f} GiB")
    lines.append(f"  {'total':38s} {sum(est['cpu'].values()) / GIB:9.2f} GiB")
    return "\n".join(lines)


@interruptible
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    opts = {"launch": "single", "gpus": "1", "nodes": "1"}
    names, overrides, given = [], [], set()
    for a in argv:
        key = a.split("=", 1)[0]
        if key == "recipe":
            names.append(a.split("=", 1)[1])
        elif key in opts:
            if key in given:
                print(f"error: {key}= given twice", file=sys.stderr)
                return 2
            given.add(key)
            opts[key] = a.split("=", 1)[1]
        else:
            overrides.append(a)
    try:
        if len(names) != 1:
            raise RecipeError("give exactly one recipe=NAME")
        recipe = load_recipe(names[0], overrides)
        counts = {}
        for key in ("gpus", "nodes"):
            try:
                counts[key] = int(opts[key])
            except ValueError:
                raise RecipeError(f"{key}: a whole number, not {opts[key]!r}") from None
        gpus, nodes = counts["gpus"], counts["nodes"]
        if gpus < 1 or nodes < 1:
            raise RecipeError(f"gpus and nodes must be at least 1 (got gpus={gpus}, nodes={nodes})")
        if opts["launch"] == "single" and gpus * nodes > 1:  # (its CPU side counted a process per GPU)
            raise RecipeError(f"launch=single runs one process on one GPU, not gpus={gpus} nodes={nodes}: use "
                              "launch=ddp (or a ZeRO / FSDP launch) for several")
        est = estimate(recipe, opts["launch"], gpus, nodes)
        comm = format_communication(recipe, opts["launch"], gpus, nodes) if opts["launch"] in ZERO3_LAUNCHES else None
    except (RecipeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_estimate(est, recipe, opts["launch"], gpus, nodes))
    if comm is not None:
        print(comm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
