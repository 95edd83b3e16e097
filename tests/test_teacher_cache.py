"""The top-k teacher cache: contents equal the teacher's top-k, and training from a cache that keeps every
token but one is training from the live teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import fast_recipe
from workbench import data, teacher_cache, trainer
from workbench.losses import topk_from_logits
from workbench.train import run


def test_cache_holds_the_teachers_topk(tmp_path, tiny_teacher, accelerator):
    from transformers import AutoModelForCausalLM

    recipe = fast_recipe("kd_tiny", tmp_path)
    tok = data.load_tokenizer(recipe.data, pretrained=str(tiny_teacher))
    packed = data.load_packed(recipe.data, tok)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    V = len(tok)
    path = tmp_path / "cache"
    teacher_cache.build(teacher, packed.train, path, 5, [1.0, 2.0], V, "float16", accelerator, 16)
    cache = teacher_cache.TeacherCache(path)
    blocks = np.array([3, 0, 7])
    got = cache.batch(blocks, "cpu")
    with torch.no_grad():
        logits = teacher(input_ids=torch.from_numpy(packed.train[blocks].astype(np.int64))).logits.reshape(-1, V)
    for t in (1.0, 2.0):
        ref = topk_from_logits(logits, 5, t)
        assert torch.equal(got[t].indices, ref.indices)
        torch.testing.assert_close(got[t].logp, ref.logp, rtol=2e-3, atol=2e-3)  # float16 storage
    # built once: a second build is a no-op
    mtime = (path / "meta.json").stat().st_mtime_ns
    teacher_cache.build(teacher, packed.train, path, 5, [1.0, 2.0], V, "float16", accelerator, 16)
    assert (path / "meta.json").stat().st_mtime_ns == mtime


def test_training_from_a_full_cache_equals_the_live_teacher(tmp_path, tiny_teacher, accelerator):
    common = ["teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}", "train.max_steps=4"]
    live = run(fast_recipe("kd_tiny", tmp_path / "live", *common), accelerator)
    cached = run(fast_recipe("kd_tiny", tmp_path / "cached", *common,
                             "distill.teacher_cache={top_k: 319, dtype: float32}"), accelerator)  # 320-token vocab
    a = {r["step"]: r for r in trainer.read_metrics(tmp_path / "live") if "train/loss" in r}
    b = {r["step"]: r for r in trainer.read_metrics(tmp_path / "cached") if "train/loss" in r}
    for step in a:
        assert b[step]["train/forward_kl"] == pytest.approx(a[step]["train/forward_kl"], rel=1e-4)
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4)
    assert cached["teacher_val_ppl"] == pytest.approx(live["teacher_val_ppl"], rel=1e-6)
    assert cached["student_val_ppl"] == pytest.approx(live["student_val_ppl"], rel=1e-3)


def test_a_cache_the_disk_cannot_hold_is_refused_before_it_is_filled(tmp_path, tiny_teacher, accelerator, monkeypatch):
    """numpy creates the cache's files sparse and the teacher then fills their memory maps: on a disk with
    too little room the process died of SIGBUS ('Bus error', no message, the disk left full of a half-built
    cache). The files' blocks are reserved first: too little room is one error naming the cache and its
    size, and the partial cache is removed."""
    from transformers import AutoModelForCausalLM

    from workbench.config import StorageError

    recipe = fast_recipe("kd_tiny", tmp_path)
    tok = data.load_tokenizer(recipe.data, pretrained=str(tiny_teacher))
    packed = data.load_packed(recipe.data, tok)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    path = tmp_path / "cache"
    reserved = []

    def no_room(fd, offset, length):
        reserved.append(length)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(teacher_cache.os, "posix_fallocate", no_room)
    with pytest.raises(StorageError, match=rf"^No space left on device \(writing the teacher's top-5 cache {path}, "
                                           rf"[\d,]+ MiB\)$"):
        teacher_cache.build(teacher, packed.train, path, 5, [1.0], len(tok), "float16", accelerator, 16)
    assert reserved == [packed.train.size * 5 * 2 + 128]  # the whole of the first file (uint16, its .npy header)
    assert not path.exists() and not path.with_name("cache.building").exists()

    # what reserving does: the file's blocks are on disk before anything is written into its map
    monkeypatch.undo()
    f = tmp_path / "sparse.npy"
    np.lib.format.open_memmap(f, "w+", np.float16, (1024, 1024)).flush()
    assert f.stat().st_blocks * 512 < f.stat().st_size  # numpy's file: sparse
    teacher_cache._reserve(f)
    assert f.stat().st_blocks * 512 >= f.stat().st_size
