"""A student cut from its teacher (depth and width pruning by measured importance, as NVIDIA's Minitron does),
written as a plain Llama checkpoint with the teacher's tokenizer, then distilled like any other student.

One pass of the teacher over calibration batches measures, with forward hooks:
- each block's importance for depth: 1 - cosine(block input, block output), averaged over tokens; a block
  that barely turns the residual stream is the cheapest to drop;
- each MLP channel's mean |act(gate) * up| (the down projection's input);
- each KV group's mean norm of its query heads' attention outputs (o_proj's input, per head): a group is
  kept or dropped whole, so grouped-query attention stays grouped.
The kept blocks keep their order; kept channels and heads keep their order within a block.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workbench.config import PruneConfig, RecipeError

log = logging.getLogger(__name__)
_PRUNE_VERSION = 1


@dataclass
class Importance:
    blocks: torch.Tensor  # [L] 1 - cosine(input, output), mean over tokens
    channels: torch.Tensor  # [L, I] mean |act(gate) * up|
    kv_groups: torch.Tensor  # [L, KV] mean norm of the group's query-head outputs


@torch.no_grad()
def measure(model, batches: list[torch.Tensor]) -> Importance:
    """Importance scores of `model` (a Llama-like AutoModelForCausalLM) on `batches` of token ids [B, T]."""
    layers = _layers(model)
    cfg = model.config
    L, heads, kv = len(layers), cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    blocks = torch.zeros(L, dtype=torch.float64)
    channels = torch.zeros(L, cfg.intermediate_size, dtype=torch.float64)
    groups = torch.zeros(L, kv, dtype=torch.float64)
    tokens = 0
    hooks = []

    def on_block(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [B, T]
            blocks[i] += (1 - cos).double().sum().cpu()
        return hook

    def on_down(i):
        def hook(module, args):
            channels[i] += args[0].float().abs().double().sum(dim=(0, 1)).cpu()
        return hook

    def on_o(i):
        def hook(module, args):
            a = args[0].float()  # [B, T, heads * head_dim]
            per_head = a.reshape(*a.shape[:-1], heads, head_dim).norm(dim=-1)  # [B, T, heads]
            groups[i] += per_head.reshape(*per_head.shape[:-1], kv, heads // kv).sum(-1).double().sum(dim=(0, 1)).cpu()
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(on_block(i), with_kwargs=True))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)))
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(input_ids=ids.to(model.device))
            tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return Importance(blocks / tokens, channels / tokens, groups / tokens)


def plan(cfg, imp: Importance, prune: PruneConfig) -> dict:
    """Which blocks, channels and KV groups to keep: {"layers": [...], "channels": [[...] per kept block],
    "kv_groups": [[...] per kept block]}."""
    L, inter, kv = cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_key_value_heads
    n_inter = prune.intermediate_size or inter
    n_kv = prune.kv_heads or kv
    if n_inter > inter:
        raise RecipeError(f"student.prune.intermediate_size: {n_inter} is more than the teacher's {inter}")
    if n_kv > kv:
        raise RecipeError(f"student.prune.kv_heads: {n_kv} is more than the teacher's {kv} key/value heads")
    n_layers = prune.layers or L
    if prune.target_params is not None:
        fixed, per_block = _param_counts(cfg, n_inter, n_kv)
        n_layers = int((prune.target_params - fixed) // per_block)
        if n_layers < 1:
            raise RecipeError(f"student.prune.target_params: {prune.target_params:.3g} does not fit one block "
                              f"({fixed + per_block:,} parameters with one)")
        n_layers = min(n_layers, L)
    if n_layers > L:
        raise RecipeError(f"student.prune.layers: {n_layers} is more than the teacher's {L} blocks")
    keep = sorted(torch.argsort(imp.blocks, descending=True)[:n_layers].tolist())
    top = lambda scores, n: sorted(torch.argsort(scores, descending=True)[:n].tolist())  # noqa: E731
    return {"layers": keep, "channels": [top(imp.channels[i], n_inter) for i in keep],
            "kv_groups": [top(imp.kv_groups[i], n_kv) for i in keep]}


def _param_counts(cfg, inter: int, kv: int) -> tuple[int, int]:
    """(parameters outside the blocks, parameters per block) of the pruned shape."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    q_heads = kv * (heads // cfg.num_key_value_heads)
    per_block = h * q_heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter + 2 * h
    fixed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h
    return fixed, per_block


@torch.no_grad()
def apply(model, keep: dict):
    """A new model of the teacher's class holding the kept blocks, channels and heads (weights copied)."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_group = heads // kv
    n_kv = len(keep["kv_groups"][0])
    cfg.num_hidden_layers = len(keep["layers"])
    cfg.intermediate_size = len(keep["channels"][0])
    cfg.num_key_value_heads = n_kv
    cfg.num_attention_heads = n_kv * per_group
    cfg.head_dim = head_dim  # no longer hidden_size / heads once heads are dropped
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep["layers"]]
    src_layers = _layers(model)
    student = AutoModelForCausalLM.from_config(cfg, dtype=next(model.parameters()).dtype)
    state = {k: v for k, v in model.state_dict().items() if ".layers." not in k}
    for new_i, (old_i, chans, groups) in enumerate(zip(keep["layers"], keep["channels"], keep["kv_groups"])):
        src = src_layers[old_i]
        kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in groups])
        q_heads = [g * per_group + j for g in groups for j in range(per_group)]
        q_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in q_heads])
        ch = torch.tensor(chans)
        pre = f"model.layers.{new_i}."
        a, m = src.self_attn, src.mlp
        pieces = {"self_attn.q_proj": (a.q_proj, q_rows, 0), "self_attn.k_proj": (a.k_proj, kv_rows, 0),
                  "self_attn.v_proj": (a.v_proj, kv_rows, 0), "self_attn.o_proj": (a.o_proj, q_rows, 1),
                  "mlp.gate_proj": (m.gate_proj, ch, 0), "mlp.up_proj": (m.up_proj, ch, 0),
                  "mlp.down_proj": (m.down_proj, ch, 1)}
        for name, (lin, idx, dim) in pieces.items():
            state[pre + name + ".weight"] = lin.weight.index_select(dim, idx).clone()
            if lin.bias is not None:
                state[pre + name + ".bias"] = lin.bias.index_select(0, idx).clone() if dim == 0 else lin.bias.clone()
        for name, p in src.named_parameters():  # norms (and anything else not sliced)
            key = pre + name
            if key not in state and not any(name.startswith(x) for x in pieces):
                state[key] = p.detach().clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RecipeError(f"student.prune: the teacher's layout is not a Llama's (missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]})")
    return student


def _layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    needed = ("self_attn", "mlp")
    if layers is None or not all(hasattr(layers[0], x) for x in needed) or not hasattr(layers[0].mlp, "gate_proj"):
        raise RecipeError("student.prune: pruning needs a Llama-like teacher (model.layers with self_attn and a "
                          "gated MLP)")
    return layers


def calibration_batches(blocks: np.ndarray, n: int, batch: int, seed: int) -> list[torch.Tensor]:
    """`n` micro-batches of training blocks, in a seeded order (not the training order's first steps)."""
    order = np.random.default_rng([seed, 7919]).permutation(len(blocks))
    take = order[: n * batch]
    return [torch.from_numpy(blocks[take[i : i + batch]].astype(np.int64)) for i in range(0, len(take), batch)]


def ensure_pruned(teacher_path: str, prune: PruneConfig, blocks: np.ndarray, batch: int, seed: int,
                  device, data_key: str) -> Path:
    """The pruned student's checkpoint directory (teacher's tokenizer included), made once per teacher,
    settings and calibration data, under cache_root()/pruned."""
    import dataclasses

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.config import ModelSpec
    from workbench.data import _hash, built_once, cache_root
    from workbench.train import _model_id

    key = _hash([_PRUNE_VERSION, _model_id(ModelSpec(name_or_path=teacher_path)), dataclasses.asdict(prune),
                 data_key, batch, seed])
    out = cache_root() / "pruned" / key
    with built_once(out, "prune.json") as tmp:
        if tmp is None:
            return out
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).to(device)
        imp = measure(teacher, calibration_batches(blocks, prune.calibration_batches, batch, seed))
        keep = plan(teacher.config, imp, prune)
        student = apply(teacher, keep)
        n_t = sum(p.numel() for p in teacher.parameters())
        n_s = sum(p.numel() for p in student.parameters())
        dropped = [i for i in range(teacher.config.num_hidden_layers) if i not in keep["layers"]]
        log.info("pruned %s: %.1fM -> %.1fM parameters; kept blocks %s (dropped %s), %d MLP channels, %d KV heads",
                 teacher_path, n_t / 1e6, n_s / 1e6, keep["layers"], dropped, len(keep["channels"][0]),
                 len(keep["kv_groups"][0]))
        student.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(teacher_path).save_pretrained(tmp)
        (tmp / "prune.json").write_text(json.dumps({
            "teacher": teacher_path, "settings": dataclasses.asdict(prune), "teacher_params": n_t,
            "student_params": n_s, "kept_layers": keep["layers"], "block_importance": imp.blocks.tolist(),
            "intermediate_size": len(keep["channels"][0]), "kv_heads": len(keep["kv_groups"][0])}, indent=1))
    return out


def describe(path: Path) -> dict:
    return json.loads((Path(path) / "prune.json").read_text())

