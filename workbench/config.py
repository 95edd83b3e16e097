"""Typed recipes: `recipes/<name>.yaml` + dotted `key=value` overrides -> a validated `Recipe`.

Nothing here loads weights or touches the network: a recipe for a 13B teacher validates on a laptop.
Every field carries a docstring (the string literal under it); `python workbench/train.py --help-recipe`
prints them.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import functools
import hashlib
import json
import logging
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


def _recipes_dir() -> Path:
    """recipes/ of the source checkout (also an editable install's); an installed wheel ships the same
    files as workbench/recipes."""
    checkout = Path(__file__).resolve().parent.parent / "recipes"
    return checkout if (checkout / "kd_tiny.yaml").is_file() else Path(__file__).resolve().parent / "recipes"


RECIPES_DIR = _recipes_dir()

# Loss names understood by workbench.losses (its registries are checked against these in tests).
DivergenceName = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
LossName = Literal[
    "cross_entropy",
    DivergenceName,
    "hidden_mse", "hidden_cosine",
    "attention_kl", "attention_logit_mse",
    "uld", "span",
]
LOGIT_DIVERGENCES = frozenset(typing.get_args(DivergenceName))
FEATURE_LOSSES = frozenset({"hidden_mse", "hidden_cosine", "attention_kl", "attention_logit_mse"})
# Logit losses across tokenizers (workbench.crosstok): the teacher reads the text in its own tokens.
CROSS_TOKENIZER_LOSSES = frozenset({"uld", "span"})
# Losses that need the teacher.
TEACHER_LOSSES = LOGIT_DIVERGENCES | FEATURE_LOSSES | CROSS_TOKENIZER_LOSSES


class WorkbenchError(Exception):
    """A mistake or condition the user can act on: the command-line tools print its message as one line
    (no traceback) and exit with status 2."""


def in_every_process(e: BaseException) -> BaseException:
    """Mark `e` as raised by every process of a launch at the same point (after a collective that told
    them all): they may then wait for each other in a barrier before they stop. An error not marked may
    be one process's alone, while the others wait in a collective it will never join (train.main)."""
    e.in_every_process = True
    return e


def another_process_stopped(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another process of the launch is gone (gloo's closed or
    reset connection, NCCL's aborted communicator or remote error)."""
    text = str(e)
    return isinstance(e, RuntimeError) and any(m in text for m in (
        "Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
        "ncclRemoteError", "remote process exited"))


class RecipeError(WorkbenchError, ValueError):
    """A recipe or override is invalid; the message names the offending key."""


class TrainingDiverged(WorkbenchError, FloatingPointError):
    """The loss, the gradients or the weights became non-finite; nothing non-finite was saved."""


class StorageError(WorkbenchError):
    """The file system refused a write: full, over quota, read-only, no permission, an I/O error."""

    errno: int | None = None  # the OS error, when known


# errno values that say "the disk / file system would not take it", not "a bug in what we asked"
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES,
                             errno.EPERM})


def out_of_memory(e: BaseException) -> str | None:
    """"out of memory (...)" when `e` is the allocator giving up (torch.OutOfMemoryError on a GPU, the CPU
    allocator's RuntimeError, Python's MemoryError), with the size asked for where it says; else None."""
    text = str(e)
    if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError: "CUDA out of memory. Tried to allocate 2.00 GiB..."
        m = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B)", text)
        return "out of memory on the GPU" + (f" ({m.group(1)} asked for)" if m else "")
    if isinstance(e, RuntimeError) and "can't allocate memory" in text:
        m = re.search(r"allocate (\d+) bytes", text)
        return "out of memory" + (f" ({int(m.group(1)) / 2**30:.1f} GiB asked for)" if m else "")
    if isinstance(e, MemoryError):
        return "out of memory"
    return None


def storage_error(e: BaseException, writing=None, into=None) -> StorageError | None:
    """`e` as a StorageError when it is the file system refusing (an OSError with one of those errnos, or
    safetensors' writer, which reports the OS error only in its message: "... (os error 28)"), naming
    `writing` (else the file the OSError names, read or written); None for anything else. torch.save's writer reports a full
    disk without the OS error ("unexpected pos ...", "iostream error"), numpy's as an OSError without one
    ("N requested and M written"): such an error while writing into the directory `into` counts when that
    file system is read-only or has less than 1 MiB left."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        m = re.search(r"\(os error (\d+)\)", str(e))
        code = int(m.group(1)) if m else None
    if code is None and isinstance(e, (RuntimeError, OSError)) and into is not None:
        try:
            st = os.statvfs(into)
        except OSError:
            st = None
        if st is not None and st.f_flag & os.ST_RDONLY:
            code = errno.EROFS
        elif st is not None and st.f_bavail * st.f_frsize < 1 << 20:
            code = errno.ENOSPC
    if code not in _STORAGE_ERRNOS:
        return None
    if writing is not None:
        err = StorageError(f"{os.strerror(code)} (writing {writing})")
    else:  # a read or a write: the file it names, if any
        name = getattr(e, "filename", None)
        err = StorageError(os.strerror(code) + (f": {name}" if name else ""))
    err.errno = code
    return err


INTERRUPTED = 130  # the exit status after Ctrl-C (128 + SIGINT), as shells report it


def interruptible(main):
    """A command's main(): Ctrl-C ends it in one line and exit status 130, not a traceback (what the
    commands write is whole or not at all, so nothing is left half written)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return INTERRUPTED

    return wrapper


def folded(e: BaseException, limit: int = 400) -> str:
    """A third-party exception's message for an error line: its lines joined, at most `limit` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------- schema


@dataclass
class QuantConfig:
    """Settings of a quantised base (`quantize`): NF4 (bitsandbytes 4-bit) or LLM.int8 (bitsandbytes 8-bit)."""

    double_quant: bool = True
    """Quantise the absmax scales too (saves 0.37 bits per parameter)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype activations and dequantised weights are computed in."""
    kernel: Literal["bnb", "triton"] = "bnb"
    """NF4 matmul kernels: bitsandbytes' own, or ours (workbench.kernels; needs a CUDA GPU)."""
    int8_threshold: float = 6.0
    """LLM.int8: input features with a magnitude above this go through a 16-bit matmul (the outliers of
    Dettmers et al. 2022); 0 quantises everything."""

    def __post_init__(self) -> None:
        _check(self.int8_threshold >= 0, "int8_threshold", "must be >= 0")


@dataclass
class AdapterConfig:
    """A peft adapter trained instead of the full weights (LoRA over an NF4 base = QLoRA)."""

    method: Literal["none", "lora", "dora", "loha", "lokr", "ia3", "vera"] = "none"
    """peft method by name; 'dora' is LoRA with weight decomposition."""
    r: int = 16
    """Rank (lora, dora, loha, lokr, vera)."""
    alpha: float = 32.0
    """Scaling numerator (lora_alpha / alpha)."""
    dropout: float = 0.05
    """Dropout on the adapter's input (lora, dora, loha, lokr, vera)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; ['all-linear'] is every linear layer but the output layer."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the peft config class."""

    def __post_init__(self) -> None:
        _check(self.r >= 1, "r", "must be >= 1")
        _check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        _check(len(self.target_modules) >= 1, "target_modules", "needs at least one name")


@dataclass
class PruneConfig:
    """A student made from the teacher by pruning (Minitron-style), then trained by the recipe. Depth: the
    blocks whose removal changes the hidden states least on calibration batches (1 - cosine of a block's
    input and output) are dropped. Width: MLP channels and attention KV groups (each with its query heads,
    so GQA stays whole) ranked by activation magnitude on the same batches. The result is a plain
    checkpoint with the teacher's tokenizer, cached; its size and perplexity before training are logged."""

    layers: Optional[int] = None
    """Blocks to keep (null: all, or as many as target_params allows)."""
    intermediate_size: Optional[int] = None
    """MLP channels to keep per block (null: all)."""
    kv_heads: Optional[int] = None
    """Key/value heads to keep per block, each with its group of query heads (null: all)."""
    target_params: Optional[float] = None
    """Parameter budget (e.g. 6.0e7): with layers null, the most blocks that fit after width pruning."""
    calibration_batches: int = 8
    """Training micro-batches the importance scores are measured on."""

    def __post_init__(self) -> None:
        for name in ("layers", "intermediate_size", "kv_heads"):
            _check(getattr(self, name) is None or getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.target_params is None or self.target_params > 0, "target_params", "must be > 0")
        _check(self.target_params is None or self.layers is None, "target_params", "or layers: give one")
        _check(self.calibration_batches >= 1, "calibration_batches", "must be >= 1")


@dataclass
class ModelSpec:
    """Where a teacher or student comes from, and how it is loaded."""

    name_or_path: Optional[str] = None
    """Hub id or local directory loaded with `AutoModelForCausalLM.from_pretrained`."""
    tiny: Optional[str] = None
    """Name of a tiny config in `workbench.models.TINY_CONFIGS`, randomly initialised (seeded)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Overrides of the tiny config's fields, e.g. `{num_hidden_layers: 2}` (only with `tiny`)."""
    recipe: Optional[str] = None
    """The final model of this recipe, trained first if it is not cached (e.g. the student of an SFT
    recipe as the base of a QLoRA distillation)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) for `name_or_path`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are held in. A student keeps fp32 master weights unless you say otherwise."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers."""
    trust_remote_code: bool = False
    """Passed to transformers; off unless you trust the repository."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """Quantise the linear layers while loading (bitsandbytes): 'nf4' (4-bit NormalFloat, double
    quantisation; with an adapter this is QLoRA) or 'int8' (LLM.int8). A GPTQ or AWQ checkpoint
    (compressed-tensors, e.g. from `python -m workbench.quantize`) is quantised already: leave this 'none'."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    """Settings of the quantised base (with quantize)."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """peft adapter (student only): train it instead of the full weights."""
    prune: Optional[PruneConfig] = None
    """Student only: start from the teacher, pruned in depth and width (see PruneConfig)."""

    def __post_init__(self) -> None:
        _not_blank(self, "name_or_path", "tiny", "recipe", "revision")
        sources = [k for k in ("name_or_path", "tiny", "recipe", "prune") if getattr(self, k)]
        if len(sources) != 1:
            raise RecipeError(
                f"name_or_path/tiny/recipe/prune: give exactly one (got {sources or 'none'})"
            )
        if self.config and not self.tiny:
            raise RecipeError("config: overrides apply to a tiny model only; set tiny")
        if self.quantize != "none" and self.tiny:
            raise RecipeError("quantize: quantising random weights makes no sense; give a pretrained "
                              "model (name_or_path or recipe)")
        if self.quantize == "int8" and self.quant.kernel == "triton":
            raise RecipeError("quant.kernel: our Triton kernels are NF4 kernels; int8 runs on bitsandbytes' (bnb)")

    @property
    def quantized(self) -> bool:
        """Held quantised by bitsandbytes while loading (nf4 or int8)."""
        return self.quantize != "none"


@dataclass
class DataConfig:
    """Training text: where it comes from, how it is tokenised, packed and split."""

    dataset: str = "stdlib"
    """'stdlib' (the embedded default corpus: the running Python's standard library source, tests
    excluded), 'stdlib_functions' (the embedded instruction task made from it: a function's signature and
    docstring as the prompt, the rest of its source as the completion, held out by file), a Hub dataset
    name, or local files: a file, a directory or a glob of .jsonl/.json/.txt/.parquet."""
    subset: Optional[str] = None
    """Hub dataset configuration name."""
    split: str = "train"
    """Split to read from a Hub dataset or from local files."""
    text_field: str = "text"
    """Column holding the text (jsonl/parquet/Hub)."""
    tokenizer: str = "auto"
    """'auto': the student's own tokenizer when it is loaded from a path, else a byte-level BPE trained
    on the corpus and cached; 'bpe': always train one; else a Hub id or local path."""
    vocab_size: int = 4096
    """Vocabulary size of a trained byte-level BPE."""
    seq_len: int = 256
    """Tokens per packed training sequence."""
    val_fraction: float = 0.05
    """Share of documents held out for validation (whole documents, chosen by a hash of their id)."""
    max_documents: Optional[int] = None
    """Read at most this many documents (quick runs and tests)."""
    format: Literal["auto", "text", "chat", "prompt_completion"] = "auto"
    """Rows of local/Hub data: 'chat' (a list of {role, content} messages, rendered with the tokenizer's chat
    template), 'prompt_completion', or 'text'; auto: chat when rows have messages_field, prompt_completion
    when they have prompt_field and completion_field, else text. Chat and prompt/completion rows train on
    the completion (assistant) tokens only, and are packed whole, never across a block boundary."""
    messages_field: str = "messages"
    """Column of chat rows."""
    prompt_field: str = "prompt"
    """Column of a prompt/completion row's prompt."""
    completion_field: str = "completion"
    """Column of a prompt/completion row's completion."""
    separate_documents: Optional[bool] = None
    """Keep packed documents apart: positions restart at each one and none attends to another (transformers
    builds the block-diagonal mask from the restarting positions). null: on for chat and prompt/completion
    rows, off for text (documents joined by EOS, as pre-training does)."""

    def __post_init__(self) -> None:
        _not_blank(self, "dataset", "tokenizer")
        _check(self.vocab_size >= 259, "vocab_size", "must be >= 259 (256 bytes + specials)")
        _check(self.seq_len >= 2, "seq_len", "must be >= 2")
        _check(0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)")
        _check(self.max_documents is None or self.max_documents >= 2, "max_documents", "must be >= 2")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = 1000
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per forward pass per process."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; the loss is normalised by valid tokens over the whole window."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms and biases)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision (accelerate)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    compile: bool = False
    """torch.compile the training step: the student's decoder (forward and, through AOTAutograd, backward)
    and the logit loss applied to each chunk of rows; compiled once per shape at the first steps."""
    seed: int = 0
    """Seeds model init, data order and every RNG."""
    log_every: int = 10
    """Steps between metric records (loss, lr, grad norm, tokens/s)."""
    eval_every: int = 100
    """Steps between validation perplexity evaluations (0: only at the end)."""
    eval_batches: int = 20
    """Validation micro-batches per evaluation (0: the whole validation split)."""
    checkpoint_every: int = 200
    """Steps between checkpoints (0: only on interruption)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("warmup_steps", "eval_every", "eval_batches", "checkpoint_every", "grad_clip"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "betas",
            "must be two numbers in [0, 1)",
        )


@dataclass
class LossTerm:
    """One term of the training objective: weight * loss(name)."""

    name: LossName = "cross_entropy"
    """Which loss (see workbench.losses)."""
    weight: float = 1.0
    """Multiplier of this term in the total loss."""
    temperature: float = 1.0
    """Softmax temperature for logit divergences (both sides softened, the term scaled by T^2; tvd by T)."""
    beta: float = 0.5
    """jsd: mixture weight of the teacher; 0 is forward KL, 1 reverse KL (GKD's convention)."""
    alpha: float = 0.1
    """skew_forward_kl / skew_reverse_kl: skew of the mixture (DistiLLM); 0 is the plain KL."""
    layer_map: Optional[list[list[int]]] = None
    """hidden_* / attention_*: [student_layer, teacher_layer] pairs (layer 0 = embeddings, i = block i);
    null maps every student block uniformly onto the teacher's."""
    head_map: Literal["average", "map"] = "average"
    """attention_*: compare head-averaged maps, or average the larger side's heads in groups ('map')."""
    normalize: bool = False
    """hidden_mse: divide each token's squared error by the teacher state's mean square (a relative error:
    the residual stream's scale grows with depth, and raw MSE can dwarf the other terms)."""
    divergence: DivergenceName = "forward_kl"
    """span: the divergence on the tokens both vocabularies share (ULD on the rest)."""
    matched_weight: Optional[float] = None
    """span: weight of the shared tokens' divergence (the rest's ULD gets 1 - it); null: the share of the
    teacher's vocabulary the student's holds too (as TRL's GOLD)."""
    teacher: int = 0
    """With several `teachers`: the index of the one this logit term compares with (each term logged)."""

    def __post_init__(self) -> None:
        _check(self.weight >= 0, "weight", "must be >= 0")
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(0.0 <= self.beta <= 1.0, "beta", "must be in [0, 1]")
        _check(0.0 <= self.alpha < 1.0, "alpha", "must be in [0, 1)")
        _check(self.layer_map != [], "layer_map", "is empty; null maps every student block uniformly")
        _check(
            self.layer_map is None or all(len(p) == 2 and min(p) >= 0 for p in self.layer_map),
            "layer_map", "must be a list of [student_layer, teacher_layer] pairs of layer numbers >= 0",
        )
        _check(self.layer_map is None or self.name in FEATURE_LOSSES, "layer_map",
               "applies to hidden_* and attention_* losses only")
        _check(not self.normalize or self.name == "hidden_mse", "normalize", "applies to hidden_mse only")
        _check(self.divergence == "forward_kl" or self.name == "span", "divergence", "applies to span only")
        _check(self.matched_weight is None or (self.name == "span" and 0.0 <= self.matched_weight <= 1.0),
               "matched_weight", "applies to span only and must be in [0, 1]")
        _check(self.teacher == 0 or self.name in LOGIT_DIVERGENCES | CROSS_TOKENIZER_LOSSES, "teacher",
               "chooses the teacher of a logit divergence, uld or span term")
        _check(self.teacher >= 0, "teacher", "must be >= 0")


@dataclass
class OnPolicyConfig:
    """Training on sequences the student generates (GKD) or the MiniLLM policy gradient."""

    method: Literal["off", "gkd", "minillm"] = "off"
    """'gkd': a share `lmbda` of micro-batches are student continuations of prompts, trained with the
    recipe's divergences; 'minillm': reverse-KL policy gradient on (teacher-mixed) samples, plus the
    recipe's losses on the training data as the language-modelling term."""
    lmbda: float = 0.5
    """gkd: probability that a micro-batch is student-generated."""
    prompt_tokens: int = 64
    """Prompts are the first prompt_tokens tokens of training blocks; for chat and prompt/completion data,
    the last prompt_tokens tokens before each block's first completion (where the answer begins)."""
    max_new_tokens: int = 64
    """Tokens generated per prompt (fewer when EOS comes first)."""
    temperature: float = 1.0
    """Sampling temperature of the generating policy."""
    top_k: int = 0
    """Sample only among the top_k tokens (0: the whole vocabulary)."""
    teacher_mix: float = 0.2
    """minillm: sample from teacher_mix * teacher + (1 - teacher_mix) * student (importance-corrected)."""
    clip: float = 0.2
    """minillm: PPO clip range of the importance ratio."""
    ppo_epochs: int = 1
    """minillm: optimizer steps per batch of samples (ratios are taken against the sampling policy)."""
    length_norm: bool = True
    """minillm: divide each future return by the number of tokens it sums."""
    reward_clip: float = 10.0
    """minillm: clip per-token rewards log p_teacher - log q_student to [-reward_clip, reward_clip] (0: off)."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.lmbda <= 1.0, "lmbda", "must be in [0, 1]")
        _check(self.prompt_tokens >= 1 and self.max_new_tokens >= 1, "prompt_tokens", "and max_new_tokens must be >= 1")
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(0.0 <= self.teacher_mix < 1.0, "teacher_mix", "must be in [0, 1)")
        _check(self.clip > 0 and self.ppo_epochs >= 1, "clip", "must be > 0 (and ppo_epochs >= 1)")
        _check(self.top_k >= 0 and self.reward_clip >= 0, "top_k", "and reward_clip must be >= 0")


@dataclass
class TeacherCacheConfig:
    """A precomputed top-k teacher: train without the teacher in memory."""

    top_k: int = 0
    """Tokens kept per position (0: no cache, the teacher runs live)."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of the cached log-probabilities."""

    def __post_init__(self) -> None:
        _check(self.top_k >= 0, "top_k", "must be >= 0")


@dataclass
class SequenceKDConfig:
    """Sequence-level KD (Kim and Rush, 2016): the teacher's own completions of the training prompts replace
    the data's completions as targets; generated once, cached, reused (validation keeps the true ones)."""

    mode: Literal["off", "greedy", "sample"] = "off"
    """'greedy' or 'sample' the teacher's completion of each training prompt (chat or prompt/completion
    rows); off: train on the data's own completions."""
    max_new_tokens: int = 128
    """Longest teacher completion (fewer when it ends with EOS)."""
    temperature: float = 1.0
    """Sampling temperature (mode sample)."""
    batch_size: int = 8
    """Prompts generated together."""
    keep_data: bool = False
    """Train on both: every training prompt twice, once with the data's completion and once with the
    teacher's (the word-level losses then see the reference too); false: the teacher's completions only."""

    def generation_key(self) -> dict:
        """What the cached completions depend on (keep_data only chooses which rows train; greedy ones do not
        depend on the temperature)."""
        key = {k: v for k, v in dataclasses.asdict(self).items() if k != "keep_data"}
        if self.mode == "greedy":
            key["temperature"] = 1.0
        return key

    def generation_seed(self, seed: int) -> int:
        """The seed sampled completions are drawn with; greedy ones do not depend on it, so every seed of a
        greedy run reads the completions seed 0 cached."""
        return seed if self.mode == "sample" else 0

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1 and self.batch_size >= 1, "max_new_tokens", "and batch_size must be >= 1")
        _check(self.temperature > 0, "temperature", "must be > 0")


@dataclass
class DistillConfig:
    """The objective: a weighted sum of loss terms."""

    losses: list[LossTerm] = field(default_factory=lambda: [LossTerm()])
    """Terms of the objective, each logged separately."""
    fused: bool = True
    """Compute logit losses chunk by chunk straight from the output layers, never holding [tokens, vocab]
    logits; falls back to chunking materialised logits where the output layer is not a plain Linear."""
    chunk_size: int = 0
    """Tokens per chunk of the logit losses (0: about 8 MiB of fp32 logits per chunk, at least 32 tokens)."""
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    """Student-generated data: GKD mixing or MiniLLM."""
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    """Precomputed top-k teacher log-probabilities."""
    sequence_kd: SequenceKDConfig = field(default_factory=SequenceKDConfig)
    """The teacher's completions of the training prompts as targets."""

    def __post_init__(self) -> None:
        _check(len(self.losses) >= 1, "losses", "needs at least one term")
        _check(sum(t.weight for t in self.losses) > 0 or self.onpolicy.method == "minillm", "losses",
               "weights must not all be 0")
        _check(self.chunk_size >= 0, "chunk_size", "must be >= 0")
        if self.teacher_cache.top_k:
            feats = sorted({t.name for t in self.losses if t.name in FEATURE_LOSSES})
            _check(not feats, "teacher_cache.top_k", f"a logit cache cannot serve {feats}; they need the live teacher")
            _check(self.onpolicy.method == "off", "teacher_cache.top_k",
                   "on-policy training scores new sequences, so it needs the live teacher")
        cross = sorted({t.name for t in self.losses if t.name in CROSS_TOKENIZER_LOSSES})
        for i in sorted({t.teacher for t in self.losses}):  # each teacher reads the student's tokens or its own
            own = sorted({t.name for t in self.losses if t.teacher == i and t.name in CROSS_TOKENIZER_LOSSES})
            same = sorted({t.name for t in self.losses if t.teacher == i and t.name in LOGIT_DIVERGENCES | FEATURE_LOSSES})
            _check(not (own and same), "losses", f"{own} compare across tokenizers; {same} need the teacher in the "
                   "student's tokens: use one kind per teacher")
        if cross:
            _check(self.onpolicy.method == "off", "onpolicy.method", f"is not available with {cross} yet")
            _check(self.sequence_kd.mode == "off", "sequence_kd.mode", f"is not available with {cross} yet")
        if self.onpolicy.method == "minillm":
            feats = sorted({t.name for t in self.losses if t.name in FEATURE_LOSSES})
            _check(not feats, "onpolicy.method", f"minillm cannot be combined with {feats}")
        if self.onpolicy.method == "gkd":
            _check(any(t.name in LOGIT_DIVERGENCES for t in self.losses), "onpolicy.method",
                   "gkd trains generated sequences with a logit divergence; add one to losses")

    @property
    def needs_teacher(self) -> bool:
        return self.onpolicy.method != "off" or any(t.name in TEACHER_LOSSES for t in self.losses)


@dataclass
class ParallelConfig:
    """Multi-process settings the launch config (launch_scripts/accelerate/*.yaml) does not hold."""

    teacher: Literal["replicated", "zero3", "zero3_offload"] = "replicated"
    """Teacher placement: a full copy per process (bf16, or NF4 / int8 with teacher.quantize), or a DeepSpeed
    ZeRO-3 inference engine partitioned over the processes (with its parameters on the CPU: zero3_offload).
    A precomputed top-k cache (distill.teacher_cache) needs no teacher at all."""
    comm_hook: Literal["none", "fp16", "bf16", "powersgd", "batched_powersgd"] = "none"
    """DDP gradient compression: cast gradients to 16 bits, or PowerSGD low-rank approximation."""
    powersgd_rank: int = 1
    """PowerSGD matrix approximation rank."""
    powersgd_warmup_steps: int = 10
    """Uncompressed all-reduce for the first steps (PowerSGD's start_powerSGD_iter, at least 2)."""
    pipeline_stages: int = 1
    """Pipeline parallelism: split the student's blocks over this many processes, one stage each (launch
    exactly that many; launch_scripts/accelerate/pipeline.yaml). 1: no pipeline."""
    pipeline_microbatches: int = 4
    """GPipe micro-batches per step (with pipeline_stages > 1): the step's micro_batch_size x grad_accum_steps
    sequences are split into this many; the idle share of each stage is about (N - 1) / (M + N - 1)."""
    pipeline_blocks: Optional[list[int]] = None
    """Decoder blocks per stage, first to last (they sum to the student's blocks); null: as even as the
    count allows. Give the last stage fewer when its output layer and loss are costly (a large vocabulary)."""

    def __post_init__(self) -> None:
        _check(self.powersgd_rank >= 1, "powersgd_rank", "must be >= 1")
        _check(self.powersgd_warmup_steps >= 0, "powersgd_warmup_steps", "must be >= 0")
        _check(self.pipeline_stages >= 1, "pipeline_stages", "must be >= 1")
        _check(self.pipeline_microbatches >= 1, "pipeline_microbatches", "must be >= 1")
        if self.pipeline_blocks is not None:
            _check(len(self.pipeline_blocks) == self.pipeline_stages and min(self.pipeline_blocks) >= 1,
                   "pipeline_blocks", f"one count >= 1 per stage ({self.pipeline_stages} stages)")


@dataclass
class EvalConfig:
    """The evaluation report written when training finishes (report.md and report.html in the run
    directory; `python workbench/evaluate.py RUN [BASELINE ...]` writes one comparing runs)."""

    report: bool = True
    """Write the report when training finishes."""
    prompts: int = 16
    """Held-out prompts for generation samples, ROUGE-L and speculative decoding (0: none)."""
    prompt_regex: Optional[str] = None
    """Prompts end right after a match of this regex in a held-out document (e.g. '^[ \\t]*def \\w+\\(');
    null: at the end of a line."""
    context_chars: int = 300
    """Characters of held-out text a prompt holds at most (from a line start)."""
    max_new_tokens: int = 48
    """Tokens generated per prompt (greedy), and the length of each reference continuation."""
    samples: int = 4
    """Generation samples (teacher vs students) shown in the report."""
    choice_items: int = 100
    """Multiple-choice items for the accuracy metric: pick a held-out line's true successor among 4
    lines of the same document, by mean log-likelihood (0: none)."""
    task_file: Optional[str] = None
    """A .jsonl of {"prompt": str, "choices": [str, ...], "label": int} scored for accuracy instead."""
    speculative: bool = True
    """Measure speculative decoding, the teacher as target and each student as draft."""
    draft_len: int = 4
    """Draft length of that measurement."""

    def __post_init__(self) -> None:
        _not_blank(self, "task_file")
        for name in ("prompts", "context_chars", "max_new_tokens", "samples", "choice_items"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("context_chars", "max_new_tokens"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.draft_len >= 1, "draft_len", "must be >= 1")
        if self.prompt_regex is not None:
            try:
                re.compile(self.prompt_regex)
            except re.error as e:
                raise RecipeError(f"prompt_regex: not a regular expression ({e})") from None


@dataclass
class HubConfig:
    """Where and how output.push_to_hub pushes the student (token: HF_TOKEN or `hf auth login`)."""

    repo_id: Optional[str] = None
    """Hub repository, 'user-or-org/name' (created if missing)."""
    private: bool = True
    """Create the repository private (false: public)."""
    revision: Optional[str] = None
    """Branch to push to (created if missing); null: main."""
    content: Literal["auto", "adapter", "merged"] = "auto"
    """What to push: the peft adapter or the merged model; auto: the adapter when the run trained one."""
    dry_run: bool = False
    """Write the folder that would be pushed (<output.dir>/hub_upload) and push nothing."""
    commit_message: str = "Upload student trained with workbench"
    """Commit message."""

    def __post_init__(self) -> None:
        if self.repo_id is not None:
            from huggingface_hub.errors import HFValidationError
            from huggingface_hub.utils import validate_repo_id

            _check(re.fullmatch(r"[\w.-]+/[\w.-]+", self.repo_id) is not None, "repo_id",
                   f"'{self.repo_id}' is not 'user-or-org/name'")
            try:  # the Hub's own rules ('../x', 'a..b/c', a name ending in '.' or '-'), before anything is staged
                validate_repo_id(self.repo_id)
            except HFValidationError as e:
                raise RecipeError(f"repo_id: {folded(e)}") from None
        if self.revision is not None:
            rev = self.revision
            bad = (not rev or rev.startswith(("/", "-")) or rev.endswith(("/", ".", ".lock")) or ".." in rev
                   or "//" in rev or "@{" in rev or any(c in rev for c in " ~^:?*[\\") or any(ord(c) < 32 for c in rev))
            _check(not bad, "revision", f"{rev!r} is not a branch name git would take")


@dataclass
class OutputConfig:
    """Where results go."""

    dir: Optional[str] = None
    """Run directory (default: outputs/<recipe name>): checkpoints, metrics, the final model."""
    tensorboard: bool = True
    """Also write TensorBoard event files under <dir>/tensorboard."""
    overwrite: bool = False
    """Start over in a run directory that already holds checkpoints or a final model."""
    push_to_hub: bool = False
    """Push the final student (with a generated model card) when training finishes; see output.hub."""
    hub: HubConfig = field(default_factory=HubConfig)
    """Hub repository and push settings."""

    def __post_init__(self) -> None:
        _check(not self.push_to_hub or self.hub.repo_id is not None, "push_to_hub",
               "needs output.hub.repo_id ('user-or-org/name')")


@dataclass
class Recipe:
    """A complete, validated training recipe."""

    name: str = "custom"
    """Recipe name (the YAML file's stem)."""
    description: str = ""
    """One line saying what the recipe does."""
    student: ModelSpec = field(default_factory=lambda: ModelSpec(tiny="llama-student-1m"))
    """The model being trained."""
    teacher: Optional[ModelSpec] = None
    """The frozen teacher (needed by distillation losses; also evaluated when present)."""
    teachers: list[ModelSpec] = field(default_factory=list)
    """Several frozen teachers instead of `teacher`, each with any tokenizer; every distillation term
    names its own by `distill.losses[i].teacher` (an index into this list)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation loop."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Objective."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Multi-process settings (teacher placement, gradient compression)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The report written after training."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Outputs."""
    resume: bool = False
    """Continue from the newest checkpoint in the run directory."""
    allow_recipe_changes: bool = False
    """With resume: continue although the recipe differs from the one the run was trained with so far
    (each change is logged and recorded in recipe_changes.jsonl; recipe.yaml then holds the new recipe)."""

    def __post_init__(self) -> None:
        if not self.name or self.name in (".", "..") or re.search(r"[/\\\x00-\x1f]", self.name):
            raise RecipeError(f"name: {self.name!r} must be a plain name (no path separators or control "
                              "characters): it names the run directory outputs/<name>")
        if self.teachers:
            self._check_teachers()
        if self.distill.needs_teacher and self.teacher is None and not self.teachers:
            names = sorted({t.name for t in self.distill.losses if t.name in TEACHER_LOSSES})
            what = f"distill.losses: {names} need" if names else f"distill.onpolicy.method={self.distill.onpolicy.method} needs"
            raise RecipeError(f"{what} a teacher; set teacher.*")
        if self.teacher is not None and self.teacher.recipe == self.name:
            raise RecipeError(f"teacher.recipe: recipe '{self.name}' cannot be its own teacher")
        if self.resume and self.output.overwrite:
            raise RecipeError("resume/output.overwrite: choose one")
        if self.student.quantized and self.student.adapter.method == "none":
            raise RecipeError(f"student.quantize: a {self.student.quantize} student trains through an adapter; set "
                              "student.adapter.method (e.g. lora)")
        if self.parallel.teacher != "replicated" and (self.teacher is None or self.teacher.quantized):
            raise RecipeError("parallel.teacher: ZeRO-3 placement needs a teacher that is not quantised (NF4 "
                              "and int8 weights are replicated)")
        if self.parallel.teacher != "replicated" and self.distill.teacher_cache.top_k:
            raise RecipeError("parallel.teacher: the top-k cache is built with a replicated teacher")
        if self.teacher is not None and self.teacher.adapter.method != "none":
            raise RecipeError("teacher.adapter: the teacher is frozen; adapters belong to the student")
        if self.distill.sequence_kd.mode != "off" and self.teacher is None:
            raise RecipeError("distill.sequence_kd: the teacher writes the targets; set teacher.*")
        if self.student.prune is not None and (self.teacher is None or self.teacher.tiny):
            raise RecipeError("student.prune: a pruned student is cut from a pretrained teacher; set "
                              "teacher.name_or_path or teacher.recipe")
        if self.teacher is not None and self.teacher.prune is not None:
            raise RecipeError("teacher.prune: only a student is made by pruning")
        if self.parallel.pipeline_stages > 1:
            self._check_pipeline()
        attention = sorted({t.name for t in self.distill.losses if t.name.startswith("attention")})
        for role, spec in (("student", self.student), ("teacher", self.teacher)):
            if attention and spec is not None and spec.attn_implementation == "flash_attention_2":
                raise RecipeError(f"{role}.attn_implementation: {attention} compare attention probabilities, which "
                                  "flash_attention_2 never forms; set it to eager (sdpa is replaced by workbench's "
                                  "recording eager attention for the run)")
        if self.train.compile and attention:
            raise RecipeError("train.compile: attention losses record maps from an eager attention as it runs; "
                              "train them without compile")

    def _check_pipeline(self) -> None:
        par, train = self.parallel, self.train
        per_step = train.micro_batch_size * train.grad_accum_steps
        if per_step % par.pipeline_microbatches:
            raise RecipeError(f"parallel.pipeline_microbatches: {par.pipeline_microbatches} does not divide the step's "
                              f"{per_step} sequences (train.micro_batch_size x train.grad_accum_steps)")
        terms = self.distill.losses
        what = [w for w, on in (
            ("several teachers", bool(self.teachers)),
            ("hidden-state and attention losses", any(t.name in FEATURE_LOSSES for t in terms)),
            ("cross-tokenizer losses", any(t.name in CROSS_TOKENIZER_LOSSES for t in terms)),
            ("on-policy training", self.distill.onpolicy.method != "off"),
            ("an adapter or a quantised student", self.student.adapter.method != "none" or self.student.quantized),
            ("packed documents kept apart (data.separate_documents)", self.data.separate_documents is True
             or (self.data.separate_documents is None and self.data.format in ("chat", "prompt_completion"))),
            ("parallel.teacher ZeRO-3 placement", par.teacher != "replicated"),
            ("parallel.comm_hook", par.comm_hook != "none"),
            ("gradient checkpointing", train.gradient_checkpointing)) if on]
        if what:
            raise RecipeError(f"parallel.pipeline_stages: pipeline stages train full-weight students on logit losses "
                              f"(divergences, cross-entropy), live teacher or top-k cache; not with {', '.join(what)}")

    def _check_teachers(self) -> None:
        n = len(self.teachers)
        if self.teacher is not None:
            raise RecipeError("teacher/teachers: choose one (teachers: [..] for several)")
        if n < 2:
            raise RecipeError("teachers: a list of two or more; one teacher goes in teacher:")
        for i, spec in enumerate(self.teachers):
            if spec.recipe == self.name:
                raise RecipeError(f"teachers.{i}.recipe: recipe '{self.name}' cannot be its own teacher")
            if spec.adapter.method != "none" or spec.prune is not None:
                raise RecipeError(f"teachers.{i}: a teacher is frozen and loaded whole (no adapter, no prune)")
        terms = self.distill.losses
        for j, t in enumerate(terms):
            if t.teacher >= n:
                raise RecipeError(f"distill.losses.{j}.teacher: {t.teacher}, but there are {n} teachers (0-{n - 1})")
        used = {t.teacher for t in terms if t.name in LOGIT_DIVERGENCES | CROSS_TOKENIZER_LOSSES}
        for i in range(n):
            if i not in used:
                raise RecipeError(f"teachers.{i}: no distill.losses term uses it (set a term's teacher: {i})")
        what = [w for w, on in (("hidden-state and attention losses", any(t.name in FEATURE_LOSSES for t in terms)),
                                ("on-policy training", self.distill.onpolicy.method != "off"),
                                ("sequence-level KD", self.distill.sequence_kd.mode != "off"),
                                ("a pruned student", self.student.prune is not None),
                                ("parallel.teacher ZeRO-3 placement", self.parallel.teacher != "replicated")) if on]
        if what:
            raise RecipeError(f"teachers: several teachers work with logit terms (divergences, uld, span) only; "
                              f"not with {', '.join(what)}")

    @property
    def teacher_specs(self) -> list[ModelSpec]:
        """The teachers, one or several ([] for none)."""
        return list(self.teachers) if self.teachers else ([] if self.teacher is None else [self.teacher])

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir).expanduser() if self.output.dir else Path("outputs") / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self, exclude: tuple[str, ...] = ("output", "resume", "allow_recipe_changes", "description",
                                                     "eval")) -> str:
        """Stable hash of everything that changes the trained model (not where it is written). Only
        values that differ from the schema's defaults count, so a new optional field does not invalidate
        cached runs; bump _FINGERPRINT_VERSION when a default that changes training changes."""
        d = {k: v for k, v in _non_default(self).items() if k not in exclude}
        for k in _BOOKKEEPING:  # when to log, evaluate and checkpoint does not change the weights
            d.get("train", {}).pop(k, None)
        return hashlib.sha256(json.dumps([_FINGERPRINT_VERSION, d], sort_keys=True).encode()).hexdigest()[:16]


class _Loader(yaml.SafeLoader):
    """YAML with 1.2's scalars: only true/false are booleans ('no', 'off' stay strings, so
    `mixed_precision=no` means "no"), and 1e-3 is a float. A key given twice in one mapping is an error
    (PyYAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"),
    list("-+0123456789."),
)


_MAX_VALUES = 100_000  # a recipe holds a few hundred; YAML aliases can expand a small file to billions


def yaml_load(text: str):
    """`text` as YAML (_Loader); RecipeError when aliases expand it past _MAX_VALUES values (an alias bomb:
    each level repeating the one before ran out of memory in whatever walked it)."""
    data = yaml.load(text, Loader=_Loader)
    count, stack = 0, [data]
    while stack:
        x = stack.pop()
        count += 1
        if count > _MAX_VALUES:
            raise RecipeError(f"YAML aliases expand this to more than {_MAX_VALUES:,} values (an alias bomb?)")
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return data


_FINGERPRINT_VERSION = 1
# bookkeeping, and how the same arithmetic is executed (compiled or eager), do not change the trained weights
_BOOKKEEPING = ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "compile")


def _non_default(obj) -> dict[str, Any]:
    """The fields of a dataclass that differ from a default-constructed one, recursively."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(value) and dataclasses.is_dataclass(default):
            sub = _non_default(value)
            if sub or type(value) is not type(default):
                out[f.name] = sub
        elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            out[f.name] = [_non_default(v) for v in value]
        elif dataclasses.is_dataclass(value):
            out[f.name] = _non_default(value)
        elif value != default:
            out[f.name] = value
    return out


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise RecipeError(f"{key}: {msg}")


def _not_blank(obj, *names: str) -> None:
    """A name or path given as an empty string (`key=` with the value forgotten) would mean the current
    directory: refused, naming the key."""
    for name in names:
        value = getattr(obj, name)
        _check(value is None or bool(value.strip()), name, "is empty; give a value (leave the key out for the default)")


# --------------------------------------------------------------------------------------------- loading


def recipe_path(name: str) -> Path:
    """recipes/<name>.yaml, or `name` itself when it is a path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise RecipeError(f"recipe file not found: {p}")
        return p
    p = RECIPES_DIR / f"{name}.yaml"
    if not p.is_file():
        known = list_recipes()
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"unknown recipe '{name}'{hint} (known: {', '.join(known)})")
    return p


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load recipes/<name>.yaml (or a YAML path), apply `key=value` overrides, validate."""
    path = recipe_path(name)
    try:
        raw = yaml_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}); a recipe is a YAML file") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: {_yaml_message(e)}") from None
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    if raw is None:
        raise RecipeError(f"{path}: the recipe is empty; a recipe is a YAML mapping (see recipes/kd_tiny.yaml)")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping")
    raw.setdefault("name", path.stem)
    given: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        text = item.split("=", 1)[1]
        if key in given:  # the last wins (a script's common overrides, then its own), but not silently
            logging.getLogger("workbench").warning("%s given twice (%r, then %r): the last one counts", key,
                                                   given[key], text)
        given[key] = text
        _set_path(raw, key, value)
    return build(Recipe, raw)


def _yaml_message(e: "yaml.YAMLError") -> str:
    """One line: what is wrong and where (line:column, 1-based)."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
    return f"invalid YAML at {where}{what}".replace("\n", " ")


def parse_override(item: str) -> tuple[str, Any]:
    """'train.lr=1e-3' -> ('train.lr', 0.001). Values are YAML ('[1, 2]', 'null', 'true')."""
    if "=" not in item:
        raise RecipeError(f"override '{item}' is not key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"override '{item}' has an empty key")
    try:
        value = yaml_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    except RecipeError as e:
        raise RecipeError(f"override {key}: {e}") from None
    _check_path(Recipe, key.split("."), key)
    return key, value


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """Turn a nested dict into the dataclass `cls`, checking keys, types and ranges."""
    if dataclasses.is_dataclass(raw):
        return raw
    if not isinstance(raw, dict):
        raise RecipeError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise RecipeError(_unknown_key_message(path))
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except RecipeError as e:
        where = prefix.rstrip(".")
        raise RecipeError(f"{where}.{e}" if where else str(e)) from None


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, path)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0])
    if value is None:
        raise RecipeError(f"{path}: may not be null")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecipeError(f"{path}: '{value}' is not one of {list(args)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{path}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise RecipeError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise RecipeError(f"{path}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{path}: expected a string, got {value!r}")
    raise TypeError(f"{path}: unsupported field type {tp}")  # a bug in the schema, not in the recipe


# --------------------------------------------------------------------------------------------- dotted keys


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return tp


def _check_path(cls: type, parts: list[str], full: str) -> None:
    """Reject a dotted key that does not exist in the schema, naming the closest one that does."""
    tp: Any = cls
    for i, part in enumerate(parts):
        tp = _unwrap_optional(tp)
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            if part not in names:
                raise RecipeError(_unknown_key_message(full))
            tp = _field_type(tp, part)
        elif origin is list:
            if not part.isdigit():
                raise RecipeError(f"{full}: '{part}' must be a list index")
            tp = typing.get_args(tp)[0]
        elif origin is dict:
            return  # free-form mapping (tiny model config overrides)
        else:
            raise RecipeError(f"{full}: '{'.'.join(parts[:i])}' is a value, not a section")


def _set_path(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = int(part)
            if idx >= len(node):
                raise RecipeError(f"{key}: index {idx} out of range (list has {len(node)} items)")
            node = node[idx]
            continue
        if node.get(part) is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        if idx == len(node):
            node.append(value)
        elif idx < len(node):
            node[idx] = value
        else:
            raise RecipeError(f"{key}: index {idx} out of range (list has {len(node)} items)")
    else:
        node[last] = value


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(_field_type(cls, f.name))
        path = f"{prefix}{f.name}"
        out.append(path)
        if dataclasses.is_dataclass(tp):
            out += _all_keys(tp, f"{path}.")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out += _all_keys(typing.get_args(tp)[0], f"{path}.0.")
    return out


_RENAMED = {"quantize_base": "quantize: nf4"}  # old key -> what replaced it


def _unknown_key_message(path: str) -> str:
    head, _, leaf = path.rpartition(".")
    if leaf in _RENAMED:
        return f"'{path}' was replaced: use {head + '.' if head else ''}{_RENAMED[leaf]}"
    candidates = _all_keys(Recipe)
    norm = ".".join("0" if p.isdigit() else p for p in path.split("."))
    close = difflib.get_close_matches(norm, candidates, n=1, cutoff=0.5)
    if not close:  # compare the last component against siblings and all leaves
        leaf = norm.rsplit(".", 1)[-1]
        by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
        m = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.5)
        close = [by_leaf[m[0]]] if m else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{path}'{hint}"


def describe_fields(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, docstring) for every field; used by --help-recipe."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())  # type: ignore[union-attr]
    rows = []
    for f in dataclasses.fields(cls):
        tp = _field_type(cls, f.name)
        inner = _unwrap_optional(tp)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(inner):
            rows += describe_fields(inner, f"{path}.")
        elif typing.get_origin(inner) is list and dataclasses.is_dataclass(typing.get_args(inner)[0]):
            rows.append((path, "list", docs.get(f.name, "")))
            rows += describe_fields(typing.get_args(inner)[0], f"{path}.N.")
        else:
            rows.append((path, _type_name(tp), docs.get(f.name, "")))
    return rows


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")
