"""A precomputed top-k teacher: the teacher's k most likely next tokens at every position of every training
block, with their log-probabilities and the log of the remaining mass, per temperature the recipe uses.
Built once (the blocks spread over processes), stored as .npy files under the cache, memory-mapped while
training, so distillation runs without the teacher in memory.

Files: indices.npy [N, T, k] (uint16 or int32), logp_T<temperature>.npy [N, T, k + 1] (float16/32),
meta.json (written last: its presence marks a complete cache).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench.data import _atomic_dir, _hash, cache_root
from workbench.losses import TopKTeacher, topk_from_logits

log = logging.getLogger(__name__)
_VERSION = 1


def cache_path(teacher_id: str, data_key: str, k: int, temperatures: list[float], vocab: int, dtype: str) -> Path:
    key = _hash(["topk", _VERSION, teacher_id, data_key, k, sorted(temperatures), vocab, dtype])
    return cache_root() / "teacher_topk" / key


def _file(t: float) -> str:
    return f"logp_T{t:g}.npy"


@torch.no_grad()
def build(teacher, blocks: np.ndarray, path: Path, k: int, temperatures: list[float], vocab: int, dtype: str,
          accelerator, micro_batch_size: int) -> Path:
    """Compute the cache for all `blocks` [N, T] unless `path` already holds it."""
    if (path / "meta.json").exists():
        return path
    N, T = blocks.shape
    idx_dtype = np.uint16 if vocab <= 65536 else np.int32
    tmp = path.with_name(path.name + ".building")
    if accelerator.is_main_process:  # preallocate; every process fills its share of the blocks
        tmp.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(tmp / "indices.npy", "w+", idx_dtype, (N, T, k)).flush()
        for t in temperatures:
            np.lib.format.open_memmap(tmp / _file(t), "w+", dtype, (N, T, k + 1)).flush()
    accelerator.wait_for_everyone()
    idx_mm = np.load(tmp / "indices.npy", mmap_mode="r+")
    logp_mm = {t: np.load(tmp / _file(t), mmap_mode="r+") for t in temperatures}
    teacher.eval()
    mine = range(accelerator.process_index * micro_batch_size, N, accelerator.num_processes * micro_batch_size)
    for a in tqdm(mine, desc="teacher top-k cache", disable=not accelerator.is_main_process):
        b = min(a + micro_batch_size, N)
        ids = torch.from_numpy(blocks[a:b].astype(np.int64)).to(accelerator.device)
        positions = getattr(blocks, "positions", None)  # packed documents kept apart
        extra = {} if positions is None else {
            "position_ids": torch.from_numpy(positions[a:b].astype(np.int64)).to(accelerator.device)}
        with accelerator.autocast():
            logits = teacher(input_ids=ids, use_cache=False, **extra).logits[..., :vocab]  # [B, T, V]
        flat = logits.reshape(-1, vocab)
        for j, t in enumerate(temperatures):
            top = topk_from_logits(flat, k, t)
            if j == 0:
                idx_mm[a:b] = top.indices.reshape(b - a, T, k).cpu().numpy().astype(idx_dtype)
            logp_mm[t][a:b] = top.logp.reshape(b - a, T, k + 1).cpu().numpy().astype(dtype)
    idx_mm.flush()
    for m in logp_mm.values():
        m.flush()
    del idx_mm, logp_mm
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "meta.json").write_text(json.dumps({"k": k, "temperatures": temperatures, "vocab": vocab,
                                                    "blocks": N, "seq_len": T, "dtype": dtype}))
        with _atomic_dir(path) as final:
            for f in tmp.iterdir():
                f.rename(final / f.name)
        tmp.rmdir()
    accelerator.wait_for_everyone()
    return path


class TeacherCache:
    """Reads a built cache: rows of the teacher for any set of training blocks."""

    def __init__(self, path: Path):
        self.meta = json.loads((Path(path) / "meta.json").read_text())
        self.indices = np.load(Path(path) / "indices.npy", mmap_mode="r")
        self.logp = {t: np.load(Path(path) / _file(t), mmap_mode="r") for t in self.meta["temperatures"]}

    def batch(self, block_indices: np.ndarray, device) -> dict[float, TopKTeacher]:
        """temperature -> TopKTeacher with rows [B * T] for these training blocks."""
        order = np.asarray(block_indices)
        idx = torch.from_numpy(self.indices[order].astype(np.int64)).to(device)
        k = idx.shape[-1]
        idx = idx.reshape(-1, k)
        return {t: TopKTeacher(idx, torch.from_numpy(np.asarray(a[order], dtype=np.float32)).to(device).reshape(-1, k + 1))
                for t, a in self.logp.items()}
