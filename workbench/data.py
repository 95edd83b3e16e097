"""Text -> token blocks: the embedded default corpus, Hub/local datasets, tokenizers, packing, batches.

The embedded default corpus is the running interpreter's standard library source (tests, generated
codec tables and pydoc's topic dump excluded): about 10 MB of real Python that every machine has.
Tokenizers and packed token arrays are cached under `cache_root()`; every cache entry is keyed by a
hash of what produced it and written atomically (temporary directory, then rename).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from workbench import rundir
from workbench.config import DataConfig, RecipeError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
_BPE_VERSION = 1  # bump when the BPE recipe changes, so caches are rebuilt
_PACK_VERSION = 2
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
# Parts of the standard library that are not hand-written source or that are test code.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "pydoc_data"}


def cache_root() -> Path:
    """$WORKBENCH_CACHE, else ~/.cache/workbench."""
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "workbench"))


# --------------------------------------------------------------------------------------------- documents


@dataclass
class Corpus:
    """Documents split into train and validation, with a fingerprint of their source."""

    train_ids: list[str]
    train_texts: list[str]
    val_ids: list[str]
    val_texts: list[str]
    fingerprint: str  # changes whenever the source text may have changed
    format: str = "text"  # text | chat | prompt_completion
    train_rows: list | None = None  # chat: [{role, content}, ...]; prompt_completion: (prompt, completion)
    val_rows: list | None = None


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted, without tests and generated tables."""
    root = stdlib_root()
    files = []
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if any(d in _STDLIB_SKIP_DIRS or d.startswith("test_") for d in parts[:-1]):
            continue
        if parts[-1].startswith(("test_", "_sysconfigdata")):
            continue
        files.append(p)
    return files


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the documents named by `cfg.dataset` and split them by a hash of their id."""
    if cfg.dataset == "stdlib":
        root = stdlib_root()
        files = stdlib_files()[: cfg.max_documents]
        if not files:
            raise RecipeError(f"data.dataset: no standard library sources found under {root}")
        ids = [str(p.relative_to(root)) for p in files]
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        meta = [sys.version, cfg.max_documents] + [(i, len(t)) for i, t in zip(ids, texts)]
        fmt, rows, split_ids = "text", None, ids
    elif cfg.dataset == FUNCTIONS:
        ids, rows, split_ids, meta = function_task(cfg.max_documents)
        fmt = "prompt_completion"
        texts = [row_text(r, fmt) for r in rows]
    else:
        ids, texts, meta, fmt, rows = _load_with_datasets(cfg)
        split_ids = ids
    extra = [] if fmt == "text" else [fmt, cfg.messages_field, cfg.prompt_field, cfg.completion_field]
    fingerprint = _hash(["corpus", cfg.dataset, cfg.subset, cfg.split, cfg.text_field, meta] + extra)
    is_val = _split_mask(split_ids, cfg.val_fraction)  # (the function task: whole files held out)
    pick = lambda xs, want: None if xs is None else [x for x, v in zip(xs, is_val) if v == want]  # noqa: E731
    return Corpus(pick(ids, False), pick(texts, False), pick(ids, True), pick(texts, True), fingerprint, fmt,
                  pick(rows, False), pick(rows, True))


FUNCTIONS = "stdlib_functions"
EMBEDDED = ("stdlib", FUNCTIONS)  # corpora made from the running interpreter's standard library


def row_prompt(tok, row, fmt: str) -> tuple[str, str]:
    """(prompt as the model sees it, reference) of a chat or prompt/completion row: the messages before the
    last assistant message (or the prompt as a user message), rendered with the tokenizer's chat template
    and the assistant turn opened when it has one; the reference is that message (or the completion)."""
    if fmt == "chat":
        last = _last_assistant(row)
        msgs, ref = row[:last], row[last]["content"]
    else:
        msgs, ref = [{"role": "user", "content": row[0]}], row[1]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), ref
    return "".join(m["content"] for m in msgs), ref


def _last_assistant(row) -> int:
    return max(j for j, m in enumerate(row) if m["role"] == "assistant")


def encode_prompts(tok, prompts: list[str], device=None, *, rendered: bool) -> dict:
    """Prompts as a padded batch of ids (`tok`'s padding side), encoded as training encodes what they
    start: `rendered` prompts (of chat or prompt/completion rows, from row_prompt) without added special
    tokens (a chat template writes its own); plain text as a document starts in pack (BOS first when the
    tokenizer has one distinct from EOS)."""
    ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
    bos = None if rendered else document_bos(tok)
    if bos is not None:
        ids = [[bos] + x for x in ids]
    enc = tok.pad({"input_ids": ids}, return_tensors="pt")
    return enc if device is None else enc.to(device)


def document_bos(tokenizer) -> int | None:
    """The token that starts each text document: the tokenizer's BOS when it has one distinct from EOS."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bos if bos not in (None, eos) else None


def row_text(row, fmt: str) -> str:
    """A chat or prompt/completion row as plain text (for training a BPE and for held-out text)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in row) if fmt == "chat" else row[0] + row[1]


def training_token_ids(cfg: DataConfig, tok, max_chars: int = 200_000) -> list[list[int]]:
    """Token ids of the training documents of `cfg` as the model sees them (chat and prompt/completion
    rows as training encodes them, _encode_examples; at most `max_chars` of each text document), e.g. to
    find the tokens a domain uses most."""
    corpus = load_corpus(cfg)
    if corpus.format == "text":
        return [tok(t[:max_chars], add_special_tokens=False).input_ids for t in corpus.train_texts]
    return [ids for ids, _ in _encode_examples(tok, corpus.train_rows, corpus.format)]


FUNCTION_PROMPT = "Complete this Python function from the standard library:\n\n"
_MAX_BODY_CHARS = 1500


def function_task(max_files: int | None = None) -> tuple[list[str], list[tuple[str, str]], list[str], list]:
    """The embedded instruction task: for every function (and method) of the standard library's sources
    that has a docstring and a body of at most _MAX_BODY_CHARS characters, prompt = FUNCTION_PROMPT + its
    signature and docstring, completion = the rest of its source (dedented). -> (row ids, (prompt,
    completion) rows, the file of each row (rows are held out by file), fingerprint metadata)."""
    import ast
    import textwrap

    root = stdlib_root()
    files = stdlib_files()[:max_files]
    ids, rows, split_ids = [], [], []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        rel = str(path.relative_to(root))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
                continue
            doc = node.body[0]
            if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
                continue
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            source = textwrap.dedent("".join(lines[start : node.end_lineno])).splitlines(keepends=True)
            head, body = "".join(source[: doc.end_lineno - start]), "".join(source[doc.end_lineno - start :])
            if not body.strip() or len(body) > _MAX_BODY_CHARS:
                continue
            ids.append(f"{rel}::{node.name}:{node.lineno}")
            rows.append((FUNCTION_PROMPT + head, body))
            split_ids.append(rel)
    return ids, rows, split_ids, [sys.version, max_files, FUNCTION_PROMPT, _MAX_BODY_CHARS, len(rows)]


def with_teacher_completions(corpus: Corpus, load_teacher, tok, cfg, key: str, seed: int = 0) -> Corpus:
    """The corpus with each training row's completion (or last assistant message) replaced by the teacher's
    own completion of its prompt (`cfg`: distill.sequence_kd; `load_teacher()` gives the model, called only
    when the completions are not cached yet), generated once and cached under
    cache_root()/seqkd/<key> as JSON lines; validation rows keep the data's completions."""
    import copy
    import dataclasses

    from tqdm.auto import tqdm

    from workbench.speculative import left_padding, target_generate

    if corpus.format == "text":
        raise RecipeError("distill.sequence_kd: needs chat or prompt/completion rows (the teacher completes "
                          "their prompts); data.dataset=stdlib_functions is the embedded one")
    path = cache_root() / "seqkd" / f"{key}.jsonl"
    if not path.is_file():
        tok = left_padding(copy.deepcopy(tok))  # the run's tokenizer keeps its own padding side
        prompts = [row_prompt(tok, row, corpus.format)[0] for row in corpus.train_rows]
        teacher = load_teacher()
        device = next(teacher.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed)
        completions = []
        teacher.eval()
        for i in tqdm(range(0, len(prompts), cfg.batch_size), desc="teacher completions (sequence KD)"):
            enc = encode_prompts(tok, prompts[i : i + cfg.batch_size], device, rendered=True)
            with torch.no_grad():
                out = target_generate(teacher, enc.input_ids, cfg.max_new_tokens, attention_mask=enc.attention_mask,
                                      temperature=0.0 if cfg.mode == "greedy" else cfg.temperature,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, generator=gen)
            completions += tok.batch_decode(out.sequences[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text("".join(json.dumps(c) + "\n" for c in completions))
        os.replace(tmp, path)
    completions = [json.loads(line) for line in path.read_text().splitlines()]
    if len(completions) != len(corpus.train_rows):
        raise RecipeError(f"{path}: holds {len(completions)} completions for {len(corpus.train_rows)} rows; delete it")
    if corpus.format == "chat":
        rows = []
        for row, c in zip(corpus.train_rows, completions):
            last = _last_assistant(row)
            rows.append(row[:last] + [{"role": "assistant", "content": c}])
    else:
        rows = [(p, c) for (p, _), c in zip(corpus.train_rows, completions)]
    keep = [j for j, r in enumerate(rows) if (r[-1]["content"] if corpus.format == "chat" else r[1])]  # not empty
    texts = [row_text(r, corpus.format) for r in rows]
    ids, texts, rows = [corpus.train_ids[j] for j in keep], [texts[j] for j in keep], [rows[j] for j in keep]
    if cfg.keep_data:  # the data's rows too: each prompt with its reference and with the teacher's answer
        ids, texts, rows = corpus.train_ids + ids, corpus.train_texts + texts, corpus.train_rows + rows
    return dataclasses.replace(corpus, train_ids=ids, train_texts=texts, train_rows=rows,
                               fingerprint=_hash([corpus.fingerprint, "seqkd", key] + ["keep_data"] * cfg.keep_data))


def _split_mask(ids: list[str], val_fraction: float) -> list[bool]:
    """Validation membership by a hash of each id (rows with the same id go together): stable when
    documents are added or removed."""
    if len(set(ids)) < 2:
        raise RecipeError(f"data: need at least 2 documents to split, found {len(set(ids))}")
    u = [int(hashlib.sha1(i.encode()).hexdigest()[:12], 16) / 16**12 for i in ids]
    mask = [x < val_fraction for x in u]
    if not any(mask):  # tiny corpora: hold out the single lowest-hash document
        mask[int(np.argmin(u))] = True
    if all(mask):
        mask[int(np.argmax(u))] = False
    return mask


def _local_files(spec: str) -> list[str] | None:
    """Files named by a path, directory or glob, or None when `spec` does not look local."""
    p = Path(spec).expanduser()
    looks_local = p.exists() or any(c in spec for c in "*?[") or spec.startswith((".", "/", "~"))
    looks_local = looks_local or p.suffix in _LOCAL_BUILDERS
    if not looks_local:
        return None
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix in _LOCAL_BUILDERS)
    else:
        files = sorted(glob.glob(str(p)))
    if not files:
        raise RecipeError(f"data.dataset: no .jsonl/.json/.txt/.parquet files at '{spec}'")
    return files


def _load_with_datasets(cfg: DataConfig) -> tuple[list[str], list[str], list]:
    import datasets

    files = _local_files(cfg.dataset)
    if files is not None:
        kinds = {_LOCAL_BUILDERS.get(Path(f).suffix) for f in files}
        if len(kinds) != 1 or None in kinds:
            raise RecipeError(f"data.dataset: mixed or unknown file types in {files[:5]}")
        builder = kinds.pop()
        empty = [f for f in files if os.path.getsize(f) == 0]
        if empty:
            raise RecipeError(f"data.dataset: {empty[0]} is empty")
        extra = {"sample_by": "document"} if builder == "text" else {}
        quiet = logging.getLogger("datasets")  # it logs a parse error with its traceback before raising
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", **extra)
        except Exception as e:  # name the file and line, not the library's "row 1" or StopIteration
            raise RecipeError(f"data.dataset: {_diagnose(files, builder, e)}") from None
        finally:
            quiet.setLevel(level)
        meta = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]
    else:
        try:
            ds = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split)
        except Exception as e:  # network, auth, or a typo: say which key to fix
            raise RecipeError(f"data.dataset: could not load Hub dataset '{cfg.dataset}': {e}") from e
        meta = [getattr(ds, "_fingerprint", None)]
    if cfg.max_documents is not None:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    meta.append(cfg.max_documents)
    fmt = _format(cfg, ds.column_names)
    where = lambda i: f"{files[0]}:{_jsonl_line(files[0], i)}" if files and len(files) == 1 and builder == "json" \
        else f"row {i + 1}"  # noqa: E731
    if fmt == "text":
        column = ds[cfg.text_field]
        for i, t in enumerate(column):
            if t is not None and not isinstance(t, str):
                raise RecipeError(f"data.text_field: {where(i)}: '{cfg.text_field}' is of type {type(t).__name__}, "
                                  "not a string")
        texts = [t for t in column if t]
        return [f"{k}" for k in range(len(texts))], texts, meta, fmt, None
    rows = []
    if fmt == "chat":
        for i, msgs in enumerate(ds[cfg.messages_field]):
            ok = isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)
            if not ok or not any(m["role"] == "assistant" for m in msgs):
                raise RecipeError(f"data.messages_field: {where(i)}: '{cfg.messages_field}' must be a list of "
                                  "{role, content} strings with at least one assistant message")
            rows.append([{"role": m["role"], "content": m["content"]} for m in msgs])
        texts = [row_text(r, "chat") for r in rows]
    else:
        for i, (p, c) in enumerate(zip(ds[cfg.prompt_field], ds[cfg.completion_field])):
            if not isinstance(p, str) or not isinstance(c, str) or not c:
                raise RecipeError(f"data.prompt_field: {where(i)}: '{cfg.prompt_field}' and '{cfg.completion_field}' "
                                  "must be strings, the completion not empty")
            rows.append((p, c))
        texts = [row_text(r, fmt) for r in rows]
    return [f"{k}" for k in range(len(rows))], texts, meta, fmt, rows


def _format(cfg: DataConfig, columns: list[str]) -> str:
    """The row format `cfg.format` names, or the one the columns show (auto)."""
    fmt = cfg.format
    if fmt == "auto":
        fmt = "chat" if cfg.messages_field in columns else \
            "prompt_completion" if {cfg.prompt_field, cfg.completion_field} <= set(columns) else "text"
    need = {"text": [cfg.text_field], "chat": [cfg.messages_field],
            "prompt_completion": [cfg.prompt_field, cfg.completion_field]}[fmt]
    missing = [c for c in need if c not in columns]
    if missing:
        key = {"text": "text_field", "chat": "messages_field", "prompt_completion": "prompt_field"}[fmt]
        raise RecipeError(f"data.{key}: '{missing[0]}' not in columns {columns}")
    return fmt


def _unreadable_parquet(files: list[str]) -> str | None:
    """The first Parquet file pyarrow cannot read, and why (a binary format: no lines to point at)."""
    import pyarrow.parquet as pq

    for f in files:
        try:
            pf = pq.ParquetFile(f)
            for i in range(pf.num_row_groups):
                pf.read_row_group(i)
        except Exception as e:  # pyarrow's ArrowInvalid, OSError, ...
            return f"{f}: not a readable Parquet file ({str(e).strip().splitlines()[0] if str(e) else type(e).__name__})"
    return None


def _first_bad_line(files: list[str], builder: str) -> str | None:
    """The first line of a text file that is not UTF-8, or (.jsonl) not a JSON object, and why."""
    for f in files:
        with open(f, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"{f}:{n}: not UTF-8 text (byte {e.start} of the line); is it a binary file?"
                if builder == "json" and f.endswith(".jsonl") and line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        return f"{f}:{n}: not a JSON object ({e.msg}, column {e.colno})"
                    except RecursionError:
                        return f"{f}:{n}: not a JSON object a row can be (nested too deeply to read)"
                    if not isinstance(row, dict):
                        return f"{f}:{n}: not a JSON object (a JSON {type(row).__name__})"
    return None


def _diagnose(files: list[str], builder: str, error: Exception) -> str:
    """Why `datasets` could not read local files, as one line naming the file and line where it can."""
    found = _unreadable_parquet(files) if builder == "parquet" else _first_bad_line(files, builder)
    if found is not None:
        return found
    root = error
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    what = f"{type(root).__name__}: {root}".strip().splitlines()[0] if str(root) else type(root).__name__
    return f"could not read {files[0] if len(files) == 1 else f'{len(files)} {builder} files'} ({what})"


def _jsonl_line(path: str, row: int) -> int:
    """Line number (1-based) of the row-th (0-based) non-blank line of a .jsonl file."""
    seen = -1
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if raw.strip():
                seen += 1
                if seen == row:
                    return n
    return row + 1


# --------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(cfg: DataConfig, corpus: Corpus | None = None, pretrained: str | None = None):
    """The tokenizer for this run.

    `pretrained` is the path or Hub id of the model whose tokenizer 'auto' should use (the student's,
    else the teacher's); with none, 'auto' trains a byte-level BPE on the training documents.
    """
    from transformers import AutoTokenizer

    source = cfg.tokenizer
    if source == "auto":
        source = pretrained or "bpe"
    if source != "bpe":
        from workbench.models import loading, resolve_source

        path = resolve_source(source)  # (a GGUF source: its converted checkpoint)
        with loading(path, f"data.tokenizer={cfg.tokenizer}"):
            tok = AutoTokenizer.from_pretrained(path)
        if tok.eos_token_id is None:
            raise RecipeError(f"data.tokenizer: tokenizer at '{source}' has no EOS token to separate documents")
        return tok
    if corpus is None:
        corpus = load_corpus(cfg)
    return _cached_bpe(corpus, cfg.vocab_size)


def _cached_bpe(corpus: Corpus, vocab_size: int):
    from transformers import PreTrainedTokenizerFast

    key = _hash(["bpe", _BPE_VERSION, corpus.fingerprint, vocab_size])
    path = cache_root() / "tokenizers" / key
    if not (path / "tokenizer.json").exists():
        log.info("training a byte-level BPE (vocab %d) on %d documents", vocab_size, len(corpus.train_texts))
        with _atomic_dir(path) as tmp:
            _train_bpe(corpus.train_texts, vocab_size).save_pretrained(tmp)
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def _train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    # long documents in bounded pieces (cut where the pre-tokenizer splits anyway): the same word counts
    tok.train_from_iterator((p for t in texts for p in pieces(t)), trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def tokenizer_fingerprint(tok) -> str:
    """Hash of the full tokenizer definition: equal hashes tokenise identically."""
    return _hash(["tok", tok.backend_tokenizer.to_str(), tok.eos_token_id, tok.bos_token_id])


# --------------------------------------------------------------------------------------------- packing


class Blocks:
    """Packed token blocks [N, T] of one split; behaves as that id array (indexing, shape, len, numpy), and
    carries what packing kept apart: `targets` [N, T] bool (tokens that are prediction targets; None: all)
    and `positions` [N, T] (restarting at each document; None: 0..T-1 in every block)."""

    def __init__(self, ids: np.ndarray, targets: np.ndarray | None = None, positions: np.ndarray | None = None):
        self.ids, self.targets, self.positions = ids, targets, positions

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx):
        return self.ids[idx]

    def __array__(self, dtype=None, copy=None):
        return self.ids if dtype is None else self.ids.astype(dtype)

    def fingerprint(self) -> str:
        """Equal for equal blocks (ids, targets and positions)."""
        h = hashlib.sha1()
        for a in (self.ids, self.targets, self.positions):
            h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes() + str(a.shape).encode())
        return h.hexdigest()[:16]

    def __getattr__(self, name):  # shape, size, dtype, ravel, astype, ...
        if name in ("ids", "targets", "positions"):
            raise AttributeError(name)
        return getattr(self.ids, name)


@dataclass
class PackedData:
    """Fixed-length token blocks for training and validation."""

    train: Blocks  # [N_train, T] token ids (+ targets and positions where packing kept documents apart)
    val: Blocks  # [N_val, T]
    val_ids: list[str]  # held-out document ids (prompts for generation come from these)
    key: str  # cache key: equal keys mean identical blocks

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def load_packed(cfg: DataConfig, tokenizer, corpus: Corpus | None = None) -> PackedData:
    """Tokenise, pack and cache the corpus. Text: documents joined by EOS, cut into seq_len blocks (with
    separate_documents, positions restart at each document). Chat and prompt/completion rows: each row
    whole in one block (longer ones cut at seq_len), targets on the completion tokens only."""
    if corpus is None:
        corpus = load_corpus(cfg)
    separate = cfg.separate_documents if cfg.separate_documents is not None else corpus.format != "text"
    extra = [] if corpus.format == "text" and not separate else [corpus.format, separate]
    key = _hash(["pack", _PACK_VERSION, corpus.fingerprint, tokenizer_fingerprint(tokenizer), cfg.seq_len] + extra)
    path = cache_root() / "packed" / key
    if not (path / "meta.json").exists():
        with _atomic_dir(path) as tmp:
            for split, texts, rows in (("train", corpus.train_texts, corpus.train_rows),
                                       ("val", corpus.val_texts, corpus.val_rows)):
                if rows is not None:
                    ids, targets, positions, cut = pack_examples(_encode_examples(tokenizer, rows, corpus.format),
                                                                 tokenizer, cfg.seq_len)
                    if cut:
                        log.warning("data: %d of %d %s rows are longer than seq_len=%d and were cut", cut,
                                    len(rows), split, cfg.seq_len)
                    if len(ids) == 0:
                        raise RecipeError(f"data: no {split} row keeps a completion token within seq_len="
                                          f"{cfg.seq_len} ({len(rows)} rows); raise data.seq_len or add rows")
                else:
                    out = pack(_encode(tokenizer, texts), tokenizer, cfg.seq_len, positions=separate)
                    (ids, positions), targets = (out if separate else (out, None)), None
                if len(ids) == 0:
                    raise RecipeError(
                        f"data: the {split} split holds fewer than seq_len={cfg.seq_len} tokens; "
                        "lower data.seq_len, raise data.val_fraction or add documents"
                    )
                np.save(tmp / f"{split}.npy", ids)
                if targets is not None:
                    np.save(tmp / f"{split}_targets.npy", targets)
                if positions is not None:
                    np.save(tmp / f"{split}_positions.npy", positions)
            (tmp / "meta.json").write_text(json.dumps({"val_ids": corpus.val_ids, "seq_len": cfg.seq_len}))
    meta = json.loads((path / "meta.json").read_text())
    load = lambda name: np.load(path / name) if (path / name).exists() else None  # noqa: E731
    blocks = {s: Blocks(np.load(path / f"{s}.npy"), load(f"{s}_targets.npy"), load(f"{s}_positions.npy"))
              for s in ("train", "val")}
    return PackedData(blocks["train"], blocks["val"], meta["val_ids"], key)


def _encode_examples(tokenizer, rows: list, fmt: str) -> Iterator[tuple[list[int], list[bool]]]:
    """(token ids, target flags) of each chat or prompt/completion row. Chat: the tokenizer's chat template;
    the conversation is cut, in characters, where each assistant message begins and ends (found by
    rendering it up to that message with and without it: the template must render a conversation's
    prefix as a prefix of it) and each piece is tokenised on its own, the assistant pieces being the
    targets. So the ids before an assistant turn are exactly those of its prompt tokenised alone, as at
    generation (tokenising the whole text instead lets a byte-level BPE merge the template's newline
    with a completion's indentation, a token the model then never sees at the end of a prompt).
    Prompt/completion: as a user and an assistant message when the tokenizer has a chat template, else the
    prompt's tokens, then the completion's and EOS as targets."""
    template = getattr(tokenizer, "chat_template", None)
    if fmt == "chat" and not template:
        raise RecipeError("data.format=chat: the tokenizer has no chat template; use a model's tokenizer "
                          "(data.tokenizer) or prompt/completion rows")
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(  # noqa: E731
        msgs, tokenize=False, add_generation_prompt=gen)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] if text else []  # noqa: E731
    for n, row in enumerate(rows):
        if fmt == "prompt_completion" and not template:
            p, c = encode(row[0]), encode(row[1]) + [tokenizer.eos_token_id]
            yield p + c, [False] * len(p) + [True] * len(c)
            continue
        msgs = row if fmt == "chat" else [{"role": "user", "content": row[0]}, {"role": "assistant", "content": row[1]}]
        text = render(msgs)
        ids, targets, at = [], [], 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before, through = render(msgs[:i], gen=True), render(msgs[: i + 1])
            if not (text.startswith(through) and through.startswith(before) and len(before) >= at):
                raise RecipeError(f"data: row {n + 1}: the tokenizer's chat template does not render a "
                                  "conversation's beginning as the beginning of the whole; cannot find the "
                                  "assistant tokens")
            for piece, target in ((text[at : len(before)], False), (text[len(before) : len(through)], True)):
                piece_ids = encode(piece)
                ids += piece_ids
                targets += [target] * len(piece_ids)
            at = len(through)
        rest = encode(text[at:])
        yield ids + rest, targets + [False] * len(rest)


def pack_examples(examples, tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Whole examples into [N, seq_len] blocks, in order, a new block when the next does not fit (longer
    ones are cut at seq_len); the rest of a block is EOS padding without targets. -> (ids, targets,
    positions restarting at each example, number of examples cut)."""
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    pad = tokenizer.eos_token_id
    blocks, cur_ids, cur_tg, cur_pos, cut = [], [], [], [], 0

    def close():
        n = seq_len - len(cur_ids)
        blocks.append((cur_ids + [pad] * n, cur_tg + [False] * n, cur_pos + list(range(n))))

    for ids, tg in examples:
        if len(ids) > seq_len:
            ids, tg, cut = ids[:seq_len], tg[:seq_len], cut + 1
        if not any(tg):
            continue  # nothing to learn from (the completion was cut away)
        if len(cur_ids) + len(ids) > seq_len:
            close()
            cur_ids, cur_tg, cur_pos = [], [], []
        cur_ids, cur_tg, cur_pos = cur_ids + ids, cur_tg + tg, cur_pos + list(range(len(ids)))
    if cur_ids:
        close()
    if not blocks:
        z = np.zeros((0, seq_len))
        return z.astype(dtype), z.astype(bool), z.astype(np.int32), cut
    ids, tg, pos = (np.array([b[j] for b in blocks]) for j in range(3))
    return ids.astype(dtype), tg.astype(bool), pos.astype(np.int32 if seq_len > 65535 else np.uint16), cut


_PIECE_CHARS = 1 << 16  # longest text handed to the tokenizer in one piece
_BATCH_CHARS = 1 << 20  # most characters handed to the tokenizer in one call (its memory grows with them)


def pieces(text: str, n: int | None = None) -> list[str]:
    """`text` cut into pieces of at most `n` characters, each cut right after a newline (or before a space)
    that is followed by a non-space: where a byte-level BPE's pre-tokenizer splits anyway, so the pieces'
    tokens joined are the whole text's tokens. A stretch with neither is cut at `n` (_PIECE_CHARS)."""
    n = n or _PIECE_CHARS
    out, a = [], 0
    while len(text) - a > n:
        window = text[a : a + n]
        cut = next((i + 1 for i in _rfind_all(window, "\n") if i + 1 < len(window) and not window[i + 1].isspace()), 0)
        if not cut:
            cut = next((i for i in _rfind_all(window, " ") if i > 0 and i + 1 < len(window)
                        and not window[i + 1].isspace() and not window[i - 1].isspace()), 0) or n
        out.append(window[:cut])
        a += cut
    out.append(text[a:])
    return out


def _rfind_all(s: str, ch: str) -> Iterator[int]:
    i = s.rfind(ch)
    while i > 0:
        yield i
        i = s.rfind(ch, 0, i)


def _encode(tokenizer, texts: list[str], batch: int = 256) -> Iterator[list[int]]:
    """Token ids of each text, in order. The tokenizer sees at most `batch` texts and _BATCH_CHARS
    characters per call: long documents are tokenised piece by piece (a single 30 MB line would otherwise
    take gigabytes at once), short ones batched."""
    group: list[tuple[int, str]] = []  # (document, piece)

    def flush():
        ids = tokenizer([p for _, p in group], add_special_tokens=False)["input_ids"] if group else []
        done: dict[int, list[int]] = {}
        for (doc, _), toks in zip(group, ids):
            done.setdefault(doc, []).extend(toks)
        group.clear()
        return done

    partial: dict[int, list[int]] = {}
    size = 0
    for d, text in enumerate(texts):
        for piece in pieces(text):
            if group and (len(group) >= batch or size + len(piece) > _BATCH_CHARS):
                for doc, toks in flush().items():
                    partial.setdefault(doc, []).extend(toks)
                size = 0
                for doc in sorted(k for k in partial if k < d):
                    yield partial.pop(doc)
            group.append((d, piece))
            size += len(piece)
    for doc, toks in flush().items():
        partial.setdefault(doc, []).extend(toks)
    for doc in sorted(partial):
        yield partial.pop(doc)


def pack(docs, tokenizer, seq_len: int, positions: bool = False):
    """Concatenate documents, each followed by EOS (and preceded by BOS when the tokenizer has a
    distinct one), and cut the stream into [N, seq_len] blocks; the ragged tail is dropped. With
    `positions`, -> (blocks, position ids restarting at each document; within a block the first
    document continues the count of the block before), else the blocks alone."""
    eos, bos = tokenizer.eos_token_id, document_bos(tokenizer)
    parts, lengths = [], []
    for ids in docs:
        doc = ([bos] if bos is not None else []) + list(ids) + [eos]
        parts.append(doc)
        lengths.append(len(doc))
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    stream = np.fromiter((t for p in parts for t in p), dtype=np.int64)
    n = len(stream) // seq_len
    blocks = stream[: n * seq_len].reshape(n, seq_len).astype(dtype)
    if not positions:
        return blocks
    starts = np.zeros(len(stream), dtype=bool)
    starts[np.cumsum([0] + lengths[:-1]).astype(np.int64)] = True
    starts = starts[: n * seq_len].reshape(n, seq_len)
    starts[:, 0] = True  # a document continued from the block before restarts here too (a fresh context)
    t = np.broadcast_to(np.arange(seq_len), (n, seq_len))
    pos = t - np.maximum.accumulate(np.where(starts, t, 0), axis=1)
    return blocks, pos.astype(np.int32 if seq_len > 65535 else np.uint16)


# --------------------------------------------------------------------------------------------- batches


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def stream_indices(n: int, seed: int, start: int, count: int) -> np.ndarray:
    """Positions [start, start + count) of an endless stream of seeded per-epoch permutations of
    range(n). Stateless: the blocks of any step are known from the step number alone, so a resumed run
    sees exactly the data it would have seen, whatever the number of processes."""
    pos = np.arange(start, start + count, dtype=np.int64)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(pos // n):
        m = pos // n == epoch
        out[m] = _epoch_permutation(n, seed, int(epoch))[pos[m] % n]
    return out


def make_batch(blocks, indices: np.ndarray) -> dict[str, torch.Tensor]:
    """input_ids and labels [B, T]; labels are the inputs (the loss shifts them by one). From Blocks that
    carry them: target_mask [B, T] (bool) and position_ids [B, T]."""
    ids = torch.from_numpy(blocks[indices].astype(np.int64))
    out = {"input_ids": ids, "labels": ids.clone()}
    if getattr(blocks, "targets", None) is not None:
        out["target_mask"] = torch.from_numpy(blocks.targets[indices].astype(bool))
    if getattr(blocks, "positions", None) is not None:
        out["position_ids"] = torch.from_numpy(blocks.positions[indices].astype(np.int64))
    return out


def mask_labels(labels: torch.Tensor, batch: dict, ignore_index: int = -100) -> torch.Tensor:
    """Next-token labels [B, T] (labels[:, t] = input t + 1) with the tokens that are no target ignored."""
    if "target_mask" not in batch:
        return labels
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = batch["target_mask"][:, 1:].to(labels.device)
    return labels.masked_fill(~keep, ignore_index)


# --------------------------------------------------------------------------------------------- helpers


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def built_once(path: Path, marker: str):
    """Build the cache directory `path` once, even with several processes: yields a temporary directory
    to write into (renamed to `path` when the block ends without error), or None when `path/marker`
    exists already; a second process waits (a lock beside `path`) and then gets None."""
    if (Path(path) / marker).is_file():
        yield None
        return
    from workbench import rundir

    lock = Path(path).parent / f".{Path(path).name}"
    rundir.lock(lock, wait=True)
    try:
        if (Path(path) / marker).is_file():
            yield None
        else:
            with _atomic_dir(path) as tmp:
                yield tmp
    finally:
        rundir.unlock(lock)


@contextlib.contextmanager
def _atomic_dir(path: Path):
    """Write into a temporary sibling directory; rename into place on success, delete on failure (a full disk,
    say, is then one line naming the entry: rundir.writing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    with rundir.writing(tmp, path):
        yield tmp
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first: theirs is identical, keep it
        shutil.rmtree(tmp, ignore_errors=True)
