"""A precomputed top-k teacher: the teacher's k most likely next tokens at every position of every training
block, with their log-probabilities and the log of the remaining mass, per temperature the recipe uses.
Built once (the blocks spread over processes), stored as .npy files under the cache, memory-mapped while
training, so distillation runs without the teacher in memory.

Files: indices.npy [N, T, k] (uint16 or int32), logp_T<temperature>.npy [N, T, k + 1] (float16/32),
meta.json (written last: its presence marks a complete cache).

A teacher with another tokenizer (crosstok) is cached per aligned group instead (`build_cross`,
`CrossCache`): for the blocks a run visits, shards shard-<first block>-<process>.npz, each holding its
blocks, their group counts and student rows, and the merged group distributions top-k per temperature.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench import rundir
from workbench.config import WorkbenchError
from workbench.data import _atomic_dir, _hash, cache_root
from workbench.losses import TopKTeacher, topk_from_logits

log = logging.getLogger(__name__)
_VERSION = 1
_CROSS_VERSION = 2  # 2: span terms keep the k largest shared and the k largest other tokens


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
        arrays = {"indices.npy": (idx_dtype, (N, T, k)), **{_file(t): (dtype, (N, T, k + 1)) for t in temperatures}}
        size = sum(np.dtype(d).itemsize * math.prod(shape) for d, shape in arrays.values())
        tmp.mkdir(parents=True, exist_ok=True)
        with rundir.writing(tmp, f"the teacher's top-{k} cache {path}, {size / 2**20:,.0f} MiB"):
            for name, (d, shape) in arrays.items():
                np.lib.format.open_memmap(tmp / name, "w+", d, shape).flush()
                _reserve(tmp / name)
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


def _reserve(path: Path) -> None:
    """Give a file numpy created sparse its disk blocks now: filling the pages of its memory map on a full
    disk killed the process with SIGBUS (no message, a half-built cache left); reserving them fails at once
    with ENOSPC. (Where the file system cannot reserve, glibc writes the zeros.)"""
    with open(path, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


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


# --------------------------------------------------------------------------------------------- across tokenizers


def cross_cache_path(teacher_id: str, data_key: str, k: int, temperatures: list[float], dtype: str,
                     shared: int) -> Path:
    key = _hash(["cross-topk", _CROSS_VERSION, teacher_id, data_key, k, sorted(temperatures), dtype, shared])
    return cache_root() / "teacher_topk" / key


def _shard_name(first_block: int, rank: int) -> str:
    return f"shard-{first_block:09d}-{rank}.npz"


@torch.no_grad()
def build_cross(teacher, cross, blocks, wanted: np.ndarray, path: Path, k: int, temperatures: list[float],
                dtype: str, accelerator, micro_batch_size: int, fused: bool, shard_blocks: int = 64) -> Path:
    """The cache of a teacher with another tokenizer (`cross`, a crosstok.CrossTokenizers) for the training
    `blocks` whose indices are in `wanted` (the blocks a run visits: its teacher never reads the others):
    per block, the aligned groups (their student rows, to check the alignment when reading) and the
    teacher's merged group distributions top-k (crosstok.GroupTopK) at each temperature. Written in
    shards of `shard_blocks` blocks, each complete when its file appears: an interrupted build resumes
    with the blocks no shard holds, a longer run adds the blocks it visits beyond a shorter one's."""
    from workbench.crosstok import teacher_groups, teacher_rows, topk_groups
    from workbench.data import make_batch, mask_labels
    from workbench.losses import shift_labels
    from workbench.models import forward_for_losses

    path.mkdir(parents=True, exist_ok=True)
    missing = np.array(CrossCache(path).missing(wanted), dtype=np.int64)
    mine = missing[accelerator.process_index::accelerator.num_processes]
    t_shared = None if cross.shared is None else cross.shared[1].to(accelerator.device)
    teacher.eval()
    bar = tqdm(total=len(mine), desc="teacher top-k cache (across tokenizers)",
               disable=not accelerator.is_main_process or not len(mine))
    for s0 in range(0, len(mine), shard_blocks):
        part = mine[s0:s0 + shard_blocks]
        cols: dict[str, list] = {"blocks": [], "groups": [], "s_first": [], "indices": []}
        cols.update({_file(t)[:-4]: [] for t in temperatures})
        for a in range(0, len(part), micro_batch_size):
            idx = part[a:a + micro_batch_size]
            batch = make_batch(blocks, idx)
            ids = batch["input_ids"]
            al = cross.align(ids, batch.get("position_ids"), mask_labels(shift_labels(ids), batch))
            dev = accelerator.device
            with accelerator.autocast():
                out = forward_for_losses(teacher, al.teacher_ids.to(dev), fused,
                                         position_ids=al.teacher_positions.to(dev))
            rows = {t: teacher_rows(out, t) for t in temperatures}
            T = ids.shape[1]
            bounds = np.searchsorted((al.s_first // T).numpy(), np.arange(len(idx) + 1))  # groups block by block
            for b in range(len(idx)):
                g0, g1 = int(bounds[b]), int(bounds[b + 1])
                cols["blocks"].append(int(idx[b]))
                cols["groups"].append(g1 - g0)
                cols["s_first"].append((al.s_first[g0:g1] - b * T).numpy().astype(np.int32))
                for j, t in enumerate(temperatures):
                    top = topk_groups(teacher_groups(rows[t], al, g0, g1, dev), k, t_shared)
                    if j == 0:
                        cols["indices"].append(top.indices.cpu().numpy().astype(np.int32))
                    cols[_file(t)[:-4]].append(top.logp.cpu().numpy().astype(dtype))
            bar.update(len(idx))
        kk = max((x.shape[1] for x in cols["indices"]), default=k)
        arrays = {"k": np.array(k), "blocks": np.array(cols["blocks"], dtype=np.int64),
                  "groups": np.array(cols["groups"], dtype=np.int64),
                  "s_first": np.concatenate(cols["s_first"]),
                  "indices": np.concatenate(cols["indices"]) if cols["indices"] else np.zeros((0, kk), np.int32)}
        for t in temperatures:
            name = _file(t)[:-4]
            arrays[name] = np.concatenate(cols[name]) if cols[name] else np.zeros((0, kk + 2), dtype)
        final = path / _shard_name(int(part[0]), accelerator.process_index)
        tmp = final.with_name(final.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(final)  # complete, or absent
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / "meta.json").write_text(json.dumps({"k": k, "temperatures": temperatures, "dtype": dtype,
                                                    "across_tokenizers": True}))
    accelerator.wait_for_everyone()
    return path


class CrossCache:
    """Reads the shards of `build_cross` into memory: the groups of any set of its blocks."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.shards, self.where = [], {}  # block -> (shard, first group, groups)
        for f in sorted(self.path.glob("shard-*.npz")):
            if f.name.endswith(".tmp.npz"):  # a shard being written (or left by a killed build)
                continue
            z = dict(np.load(f))
            starts = np.concatenate([[0], np.cumsum(z["groups"])])
            for b, a, n in zip(z["blocks"].tolist(), starts[:-1].tolist(), z["groups"].tolist()):
                self.where[b] = (len(self.shards), a, n)
            self.shards.append(z)

    def missing(self, wanted) -> list[int]:
        return sorted(set(int(b) for b in wanted) - set(self.where))

    def batch(self, block_indices, device):
        """-> (s_first [G] block-local student rows, {temperature: crosstok.GroupTopK}) of these blocks'
        groups, block after block."""
        from workbench.crosstok import GroupTopK

        parts = []
        for b in np.asarray(block_indices).tolist():
            if b not in self.where:
                raise WorkbenchError(f"{self.path}: block {b} is not in the teacher cache (built for a shorter run, or "
                                     "another data order?); delete it to rebuild")
            parts.append(self.where[b])
        take = lambda key: np.concatenate([self.shards[s][key][a:a + n] for s, a, n in parts])  # noqa: E731
        temps = [k for k in self.shards[0] if k.startswith("logp_T")] if self.shards else []
        idx = torch.from_numpy(take("indices").astype(np.int64)).to(device)
        top_k = int(self.shards[0]["k"]) if self.shards else None
        out = {float(k[len("logp_T"):]): GroupTopK(idx, torch.from_numpy(take(k).astype(np.float32)).to(device), top_k)
               for k in temps}
        counts = [n for _, _, n in parts]
        return torch.from_numpy(take("s_first").astype(np.int64)), counts, out
