"""Text -> token blocks: the embedded default corpus, Hub/local datasets, tokenizers, packing, batches.

The embedded default corpus is the running interpreter's standard library source (tests, generated
codec tables and pydoc's topic dump excluded): about 10 MB of real Python that every machine has.
Tokenizers and packed token arrays are cached under `cache_root()`; every cache entry is keyed by a
hash of what produced it and written atomically (temporary directory, then rename).
"""

from __future__ import annotations

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

from workbench.config import DataConfig, RecipeError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
_BPE_VERSION = 1  # bump when the BPE recipe changes, so caches are rebuilt
_PACK_VERSION = 1
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
    else:
        ids, texts, meta = _load_with_datasets(cfg)
    fingerprint = _hash(["corpus", cfg.dataset, cfg.subset, cfg.split, cfg.text_field, meta])
    is_val = _split_mask(ids, cfg.val_fraction)
    pick = lambda xs, want: [x for x, v in zip(xs, is_val) if v == want]  # noqa: E731
    return Corpus(pick(ids, False), pick(texts, False), pick(ids, True), pick(texts, True), fingerprint)


def _split_mask(ids: list[str], val_fraction: float) -> list[bool]:
    """Validation membership by a hash of each id: stable when documents are added or removed."""
    if len(ids) < 2:
        raise RecipeError(f"data: need at least 2 documents to split, found {len(ids)}")
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
    if cfg.text_field not in ds.column_names:
        raise RecipeError(f"data.text_field: '{cfg.text_field}' not in columns {ds.column_names}")
    if cfg.max_documents is not None:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    column = ds[cfg.text_field]
    for i, t in enumerate(column):
        if t is not None and not isinstance(t, str):
            where = f"{files[0]}:{_jsonl_line(files[0], i)}" if files and len(files) == 1 and builder == "json" else \
                f"row {i + 1}"
            raise RecipeError(f"data.text_field: {where}: '{cfg.text_field}' is of type {type(t).__name__}, not a string")
    texts = [t for t in column if t]
    meta.append(cfg.max_documents)
    return [f"{k}" for k in range(len(texts))], texts, meta


def _diagnose(files: list[str], builder: str, error: Exception) -> str:
    """Why `datasets` could not read local files, as one line naming the file and line where it can."""
    for f in files:
        with open(f, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"{f}:{n}: not UTF-8 text (byte {e.start} of the line); is it a binary file?"
                if builder == "json" and f.endswith(".jsonl") and line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        return f"{f}:{n}: not a JSON object ({e.msg}, column {e.colno})"
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
        from workbench.models import resolve_source

        tok = AutoTokenizer.from_pretrained(resolve_source(source))
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


@dataclass
class PackedData:
    """Fixed-length token blocks for training and validation."""

    train: np.ndarray  # [N_train, T] token ids
    val: np.ndarray  # [N_val, T] token ids
    val_ids: list[str]  # held-out document ids (prompts for generation come from these)
    key: str  # cache key: equal keys mean identical blocks

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def load_packed(cfg: DataConfig, tokenizer, corpus: Corpus | None = None) -> PackedData:
    """Tokenise, pack and cache the corpus (documents joined by EOS, cut into seq_len blocks)."""
    if corpus is None:
        corpus = load_corpus(cfg)
    key = _hash(["pack", _PACK_VERSION, corpus.fingerprint, tokenizer_fingerprint(tokenizer), cfg.seq_len])
    path = cache_root() / "packed" / key
    if not (path / "meta.json").exists():
        with _atomic_dir(path) as tmp:
            for split, texts in (("train", corpus.train_texts), ("val", corpus.val_texts)):
                blocks = pack(_encode(tokenizer, texts), tokenizer, cfg.seq_len)
                if len(blocks) == 0:
                    raise RecipeError(
                        f"data: the {split} split holds fewer than seq_len={cfg.seq_len} tokens; "
                        "lower data.seq_len, raise data.val_fraction or add documents"
                    )
                np.save(tmp / f"{split}.npy", blocks)
            (tmp / "meta.json").write_text(json.dumps({"val_ids": corpus.val_ids, "seq_len": cfg.seq_len}))
    meta = json.loads((path / "meta.json").read_text())
    return PackedData(np.load(path / "train.npy"), np.load(path / "val.npy"), meta["val_ids"], key)


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


def pack(docs, tokenizer, seq_len: int) -> np.ndarray:
    """Concatenate documents, each followed by EOS (and preceded by BOS when the tokenizer has a
    distinct one), and cut the stream into [N, seq_len] blocks; the ragged tail is dropped."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id not in (None, eos) else None
    parts = []
    for ids in docs:
        if bos is not None:
            parts.append([bos])
        parts.append(ids)
        parts.append([eos])
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    stream = np.fromiter((t for p in parts for t in p), dtype=np.int64)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len).astype(dtype)


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


def make_batch(blocks: np.ndarray, indices: np.ndarray) -> dict[str, torch.Tensor]:
    """input_ids and labels [B, T]; labels are the inputs (the loss shifts them by one)."""
    ids = torch.from_numpy(blocks[indices].astype(np.int64))
    return {"input_ids": ids, "labels": ids.clone()}


# --------------------------------------------------------------------------------------------- helpers


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _atomic_dir:
    """Write into a temporary sibling directory; rename into place on success, delete on failure."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            os.replace(self.tmp, self.path)
        except OSError:  # another process finished first: theirs is identical, keep it
            shutil.rmtree(self.tmp, ignore_errors=True)
