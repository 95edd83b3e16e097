"""Two CPU processes over gloo, launched with `accelerate launch` and our launch configs: DDP and DeepSpeed
ZeRO-3 with optimizer and parameter offload reproduce a single-process run, ZeRO-3 really partitions,
checkpoints resume exactly and consolidate with DeepSpeed's tooling, a ZeRO-3 teacher equals a replicated
one, and gradient compression hooks train while sending fewer bytes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import FAST, REPO, fast_recipe, one_error_line
from workbench import trainer
from workbench.train import run

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="multi-process tests run on Linux")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, out, *overrides, recipe="kd_tiny", timeout=900, with_log=False):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           f"launch_scripts/accelerate/{config}.yaml", "--main_process_port", str(_port()),
           "workbench/train.py", f"recipe={recipe}", *FAST, f"output.dir={out}", *overrides]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    # a library's warning shows once per run, not once per collective (ZeRO-3 made 1,444 lines of them)
    said = [line[line.index("Warning: "):] for line in (done.stdout + done.stderr).splitlines() if "Warning: " in line]
    assert len(said) == len(set(said)), sorted(said)[:5]
    metrics = json.loads((out / "final_metrics.json").read_text())
    return (metrics, done.stdout + done.stderr) if with_log else metrics


def _losses(out):
    return {r["step"]: r["train/loss"] for r in trainer.read_metrics(out) if "train/loss" in r}


def _record(out, key):
    return next(r for r in trainer.read_metrics(out) if key in r)


def _kd_args(teacher):
    return ["teacher.recipe=null", f"teacher.name_or_path={teacher}"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_teacher, accelerator):
    """The reference: one process, micro-batch 4."""
    out = tmp_path_factory.mktemp("single")
    metrics = run(fast_recipe("kd_tiny", out, *_kd_args(tiny_teacher)), accelerator)
    return out, metrics


def _match(a, b, rel):
    la, lb = _losses(a), _losses(b)
    assert la.keys() == lb.keys()
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=rel), (step, la[step], lb[step])


def _resume_from_step_3(config, full, cut, args):
    """Copy a finished 6-step run, drop everything after its step-3 checkpoint, resume: same losses."""
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000006")
    for p in ("model", "adapter", "final_metrics.json"):
        if (cut / p).is_dir():
            shutil.rmtree(cut / p)
        elif (cut / p).exists():
            (cut / p).unlink()
    _launch(config, cut, *args, "resume=true")
    assert _losses(cut) == _losses(full)


def test_ddp_two_processes_match_one_and_resume(tmp_path, tiny_teacher, single):
    args = [*_kd_args(tiny_teacher), "train.micro_batch_size=2"]
    metrics = _launch("cpu2_ddp", tmp_path / "full", *args)
    _match(single[0], tmp_path / "full", rel=1e-4)
    assert metrics["student_val_ppl"] == pytest.approx(single[1]["student_val_ppl"], rel=1e-3)
    rec = _record(tmp_path / "full", "parallel/processes")
    assert rec["parallel/processes"] == 2 and rec["parallel/param_elements_local"] == rec["parallel/param_elements_total"]
    _resume_from_step_3("cpu2_ddp", tmp_path / "full", tmp_path / "cut", args)


def test_zero3_offload_partitions_matches_resumes_and_consolidates(tmp_path, tiny_teacher, single):
    from safetensors.torch import load_file

    full = tmp_path / "full"
    args = [*_kd_args(tiny_teacher), "train.micro_batch_size=2", "train.checkpoint_every=3"]
    metrics = _launch("cpu2_zero3_offload", full, *args)
    # the same optimisation as one process with the whole batch (CPU Adam vs torch AdamW rounding aside)
    _match(single[0], full, rel=1e-3)
    assert metrics["student_val_ppl"] == pytest.approx(single[1]["student_val_ppl"], rel=1e-2)
    rec = _record(full, "parallel/processes")
    assert rec["parallel/zero_stage"] == 3
    assert rec["parallel/param_elements_local"] <= 0.55 * rec["parallel/param_elements_total"]  # partitioned
    ds_config = json.loads((full / "deepspeed_config.json").read_text())
    assert ds_config["train_micro_batch_size_per_gpu"] == 2 and ds_config["train_batch_size"] == 4
    assert "auto" not in json.dumps(ds_config)

    # resume from the step-3 checkpoint of a copy: steps 4-6 repeat exactly
    _resume_from_step_3("cpu2_zero3_offload", full, tmp_path / "cut", args)

    # DeepSpeed's zero_to_fp32 gathers the partitions into the weights the run saved at the end
    from workbench.consolidate import consolidate

    dst = consolidate(full / "checkpoints" / "step-0000006", tmp_path / "consolidated")
    got, want = load_file(dst / "model.safetensors"), load_file(full / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert (got[k].float() - want[k].float()).abs().max() < 1e-6, k

    # and DeepSpeed's own script, copied into the checkpoint, finds the tag by itself (the `latest` file);
    # (its --safe_serialization refuses the tied embedding and output layer: torch.save's format here)
    ckpt = full / "checkpoints" / "step-0000006"
    done = subprocess.run([sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(tmp_path / "by_script")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import torch

    by_script = torch.load(tmp_path / "by_script" / "pytorch_model.bin", weights_only=True)
    for k in want:
        assert (by_script[f"student.{k}"].float() - got[k].float()).abs().max() == 0, k


def test_lora_adapter_saved_from_zero3_partitions(tmp_path, tiny_teacher):
    """A LoRA student under ZeRO-3: the adapter is gathered from the partitions, loads with plain peft over
    the base, and equals the merged model the run saved. The main process then writes the report alone
    (its model loading must not wait for partitioning collectives the other process never joins)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _launch("cpu2_zero3_offload", tmp_path, *_kd_args(tiny_teacher), "train.micro_batch_size=2", "train.max_steps=3",
            "student.tiny=null", f"student.name_or_path={tiny_teacher}", "train.lr=1e-2",
            "student.adapter={method: lora, r: 4, alpha: 8, dropout: 0.0}", "eval.report=true", "eval.prompts=2",
            "eval.max_new_tokens=4", "eval.choice_items=4", "eval.samples=1", timeout=300)
    assert json.loads((tmp_path / "report.json").read_text())["speculative"]["kd_tiny"]["identical"]
    base = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        b = base(input_ids=ids).logits  # before peft injects the adapter into `base` in place
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
        a, m = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(a, m, rtol=1e-4, atol=1e-4)
    assert (a - b).abs().max() > 1e-3  # the adapter learned something (not zeros from empty partitions)


def test_zero3_teacher_equals_replicated(tmp_path, tiny_teacher, single):
    metrics = _launch("cpu2_ddp", tmp_path, *_kd_args(tiny_teacher), "train.micro_batch_size=2",
                      "parallel.teacher=zero3")
    assert metrics["teacher_val_ppl"] == pytest.approx(single[1]["teacher_val_ppl"], rel=1e-5)
    _match(single[0], tmp_path, rel=1e-4)


@pytest.mark.parametrize("hook, ratio", [("fp16", 0.55), ("powersgd", 0.25)])  # torch's bf16 hook needs NCCL
def test_gradient_compression_trains_and_sends_less(tmp_path, hook, ratio):
    """The 1.3M student fills two DDP buckets by default: 30 steps of PowerSGD over gloo then used to
    abort on all-reduces issued in different orders (3 runs out of 3), fixed by one bucket."""
    common = ["student.tiny=llama-student-1m", "train.micro_batch_size=2", "train.max_steps=30",
              "train.log_every=3", "train.lr=3e-3", "train.eval_every=0", "train.checkpoint_every=0"]
    plain = _launch("cpu2_ddp", tmp_path / "plain", *common, recipe="sft_tiny")
    packed = _launch("cpu2_ddp", tmp_path / hook, *common, f"parallel.comm_hook={hook}",
                     "parallel.powersgd_warmup_steps=2", recipe="sft_tiny")
    sent = {r["step"]: r["parallel/comm_bytes_per_step"] for r in trainer.read_metrics(tmp_path / hook)
            if "parallel/comm_bytes_per_step" in r}
    full = {r["step"]: r["parallel/comm_bytes_per_step"] for r in trainer.read_metrics(tmp_path / "plain")
            if "parallel/comm_bytes_per_step" in r}
    assert sent[30] < ratio * full[30], (sent, full)  # after PowerSGD's warm-up
    losses = _losses(tmp_path / hook)
    assert losses[30] < losses[3] - 0.3  # still learning
    assert packed["student_val_ppl"] < 1.25 * plain["student_val_ppl"]


# --------------------------------------------------------------------------------------------- pipeline


def test_pipeline_two_stages_match_one_process_resume_and_save_a_plain_model(tmp_path, tiny_teacher, single):
    """GPipe over 2 gloo processes (1 block each, 2 micro-batches of 2): the losses, gradient norms and
    validation perplexity of one process with micro-batch 4; resumes exactly; the stages' shards make one
    checkpoint that plain transformers loads, with the weights one process trained."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    args = [*_kd_args(tiny_teacher), "parallel.pipeline_stages=2", "parallel.pipeline_microbatches=2"]
    full = tmp_path / "full"
    metrics, said = _launch("cpu2_pipeline", full, *args, with_log=True)
    assert "teacher: loaded by the last pipeline stage (process 1) alone" in said
    _match(single[0], full, rel=1e-5)
    norms = lambda out: {r["step"]: r["grad_norm"] for r in trainer.read_metrics(out) if "grad_norm" in r}  # noqa: E731
    assert norms(full) == pytest.approx(norms(single[0]), rel=1e-5)
    assert metrics["student_val_ppl"] == pytest.approx(single[1]["student_val_ppl"], rel=1e-5)
    assert metrics["teacher_val_ppl"] == pytest.approx(single[1]["teacher_val_ppl"], rel=1e-6)
    rec = _record(full, "parallel/bubble_fraction")
    assert len(rec["parallel/stage_busy_fraction"]) == 2 and 0 < rec["parallel/bubble_fraction"] < 1
    assert rec["parallel/gpipe_bubble_bound"] == pytest.approx(1 / 3)

    model = AutoModelForCausalLM.from_pretrained(full / "model")  # two shards + index, tied embedding
    want = load_file(single[0] / "model" / "model.safetensors")
    got = model.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5)
    assert got["lm_head.weight"].data_ptr() == got["model.embed_tokens.weight"].data_ptr()

    _resume_from_step_3("cpu2_pipeline", full, tmp_path / "cut", args)


def test_pipeline_from_the_teacher_cache_with_four_microbatches(tmp_path, tiny_teacher, accelerator):
    """The last stage reads the top-k cache (full k: the dense loss) by each micro-batch's block indices:
    the same losses as one process reading it."""
    cache = ["distill.teacher_cache={top_k: 319, dtype: float32}", "train.eval_every=0"]
    ref = tmp_path / "single"
    run(fast_recipe("kd_tiny", ref, *_kd_args(tiny_teacher), *cache), accelerator)
    _launch("cpu2_pipeline", tmp_path / "pp", *_kd_args(tiny_teacher), *cache, "parallel.pipeline_stages=2",
            "parallel.pipeline_microbatches=4")
    _match(ref, tmp_path / "pp", rel=1e-5)


def test_pipeline_teacher_is_loaded_by_the_last_stage_and_its_errors_stop_every_stage(tmp_path, tiny_teacher):
    """Another tokenizer than the teacher's (vocabulary 300 against 320): the last stage, the only one that
    loads the teacher, finds it; both processes stop with the one error line, none waits forever."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch_scripts/accelerate/cpu2_pipeline.yaml",
           "--main_process_port", str(_port()), "workbench/train.py", "recipe=kd_tiny", *FAST, f"output.dir={tmp_path}",
           *_kd_args(tiny_teacher), "parallel.pipeline_stages=2", "data.tokenizer=bpe", "data.vocab_size=300"]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "tokenizer" in errors[0], done.stderr[-3000:]
    assert "]: Traceback" not in done.stderr  # no process raised (the launcher reports the exit code its own way)


def test_pipeline_needs_one_process_per_stage(tmp_path, tiny_teacher, accelerator):
    from workbench.config import RecipeError

    with pytest.raises(RecipeError, match="launch exactly 2 processes, one per stage"):
        run(fast_recipe("kd_tiny", tmp_path, *_kd_args(tiny_teacher), "parallel.pipeline_stages=2"), accelerator)


# --------------------------------------------------------------------------------------------- launch configs


def test_every_launch_config_is_complete():
    import yaml

    from workbench.config import load_recipe
    from workbench.distributed import fill_deepspeed_config

    configs = sorted((REPO / "launch_scripts" / "accelerate").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"single", "multi_gpu", "zero2", "zero3", "zero3_offload", "zero3_nvme", "fsdp2"}
    recipe = load_recipe("kd_13b_to_7b")
    for path in configs:
        cfg = yaml.safe_load(path.read_text())
        assert cfg["distributed_type"] in ("NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP"), path
        assert "accelerate launch --config_file" in path.read_text() or path.stem.startswith("cpu2"), path
        ds = cfg.get("deepspeed_config", {}).get("deepspeed_config_file")
        if ds:
            filled = fill_deepspeed_config(json.loads((REPO / ds).read_text()), recipe, 4096, 8)
            assert "auto" not in json.dumps(filled), path
            assert filled["train_batch_size"] == 1 * 16 * 8 and filled["bf16"]["enabled"] is True


def test_deepspeed_config_disagreeing_with_the_recipe_is_an_error():
    from workbench.config import RecipeError, load_recipe
    from workbench.distributed import fill_deepspeed_config

    with pytest.raises(RecipeError, match="train_micro_batch_size_per_gpu=3 but the recipe implies 1"):
        fill_deepspeed_config({"train_micro_batch_size_per_gpu": 3}, load_recipe("kd_13b_to_7b"), 64, 2)
    with pytest.raises(RecipeError, match="has an 'optimizer' section"):
        fill_deepspeed_config({"optimizer": {"type": "Adam"}}, load_recipe("kd_13b_to_7b"), 64, 2)


def test_slurm_script_is_valid_bash_and_names_real_configs():
    script = REPO / "launch_scripts" / "slurm_multinode.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "resume=true" in text and "--signal=TERM" in text
    assert (REPO / "launch_scripts" / "accelerate" / "zero3.yaml").exists()


def test_optimizer_is_torchs_fused_adamw_and_updates_as_the_plain_one():
    """make_optimizer takes torch's fused AdamW (transformers' Trainer default) for floating CPU parameters;
    five updates land where the unfused AdamW's do, to float rounding."""
    import types

    import torch
    from accelerate import Accelerator

    from workbench import distributed as dist

    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (16, 64)]
    a = [torch.randn(s, requires_grad=True) for s in shapes]
    b = [p.detach().clone().requires_grad_() for p in a]
    cfg = types.SimpleNamespace(lr=1e-2, betas=(0.9, 0.95))
    groups = [{"params": a[::2], "weight_decay": 0.1}, {"params": a[1:2], "weight_decay": 0.0}]
    ours = dist.make_optimizer(groups, cfg, Accelerator(cpu=True))
    assert ours.defaults["fused"] is True
    plain = torch.optim.AdamW([{"params": b[::2], "weight_decay": 0.1}, {"params": b[1:2], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95), fused=False, foreach=False)
    for _ in range(5):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        ours.step()
        plain.step()
    for p, q in zip(a, b):
        assert not torch.equal(p, torch.zeros_like(p))
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert dist._can_fuse_adamw([{"params": [torch.zeros(2, dtype=torch.float64, device="meta")]}]) is False


def test_consolidate_cli_refuses_to_overwrite_and_reports_bad_checkpoints(tmp_path, accelerator, capsys):
    """A single-process checkpoint consolidates to the weights the run saved; a second run into the same
    destination is refused (one line, exit 2, the first model untouched) unless --overwrite; a directory
    that is no checkpoint and a truncated weights file are one error line each, and leave nothing behind."""
    from safetensors.torch import load_file

    from workbench.consolidate import main as consolidate_main

    run(fast_recipe("sft_tiny", tmp_path / "run", "train.max_steps=2", "train.checkpoint_every=2"), accelerator)
    ckpt, dst = tmp_path / "run" / "checkpoints" / "step-0000002", tmp_path / "student"

    def one_line_error(argv):
        code = consolidate_main(argv)
        return one_error_line(code, capsys.readouterr().err)

    assert consolidate_main([str(ckpt), str(dst)]) == 0
    got, want = load_file(dst / "model.safetensors"), load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert got.keys() == want.keys() and all(bool((got[k] == want[k]).all()) for k in want)
    (dst / "note.txt").write_text("mine")
    assert "exists and is not empty" in one_line_error([str(ckpt), str(dst)])
    assert (dst / "note.txt").read_text() == "mine"
    assert consolidate_main([str(ckpt), str(dst), "--overwrite"]) == 0
    assert not (dst / "note.txt").exists() and (dst / "config.json").is_file()
    for into in (ckpt, ckpt.parent):  # the checkpoint itself, or its folder: deleted by --overwrite before
        assert one_line_error([str(ckpt), str(into), "--overwrite"]) == (
            f"error: destination {into} would replace {ckpt}, which it is made from: choose another destination")
    assert (ckpt / "trainer_state.json").is_file()

    not_a_checkpoint = tmp_path / "run"  # a run directory, not one of its checkpoints
    assert one_line_error([str(not_a_checkpoint), str(tmp_path / "x")]) == (
        f"error: {not_a_checkpoint} is a run directory, not a checkpoint: give one of its checkpoints, e.g. {ckpt} "
        f"(its final model, {not_a_checkpoint / 'model'}, is a plain transformers model already)")
    assert f"is {tmp_path / 'student'} a workbench checkpoint?" in one_line_error([str(tmp_path / "student"),
                                                                                  str(tmp_path / "x")])
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:1000])
    assert "unreadable weights" in one_line_error([str(broken), str(tmp_path / "y")])
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y*"))


_PATCHED_TRAIN = """
import sys
sys.path.insert(0, {repo!r})
import torch.distributed
import workbench.train as T
{patch}
sys.argv = ["workbench/train.py", *sys.argv[1:]]
sys.exit(T.main())
"""


def _launch_patched(tmp_path, config: str, patch: str | None, *args, timeout: int = 600) -> tuple[int, str]:
    """train.py under accelerate launch (2 CPU processes), each process running `patch` (code: a write made
    to fail, say) first; -> (exit status, everything printed)."""
    script = "workbench/train.py"
    if patch is not None:
        script = tmp_path / "patched_train.py"
        script.write_text(_PATCHED_TRAIN.format(repo=str(REPO), patch=patch))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch_scripts/accelerate/{config}.yaml",
           "--main_process_port", str(_port()), str(script), *args]
    launch = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = launch.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a launch that hangs: its workers (own sessions) are stopped too
        import psutil

        for process in [*psutil.Process(launch.pid).children(recursive=True), launch]:
            process.kill()
        out, err = launch.communicate()
        pytest.fail(f"the launch did not end within {timeout} s:\n{(out + err)[-3000:]}")
    return launch.returncode, out + err


def _errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error:")]


_FAIL_ONE_RANK = """
from accelerate import Accelerator
from safetensors import SafetensorError

RANK, CALL = {rank}, {call}
original, calls = Accelerator.save_state, []

def save_state(self, path, *a, **k):
    calls.append(path)
    if self.process_index == RANK and len(calls) == CALL:  # this rank alone finds the disk full
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return original(self, path, *a, **k)

Accelerator.save_state = save_state
"""


@pytest.mark.parametrize("rank", [0, 1])
def test_a_write_that_fails_in_one_process_stops_every_process_at_once(tmp_path, tiny_teacher, rank):
    """Under DDP one process alone cannot write its part of the second checkpoint: every process learns it
    in the collective that took the place of the barrier and stops (the others waited in their next
    collective and ended in gloo's 'Connection reset by peer' traceback); the main process says what was
    being written and that the first checkpoint is kept; the partial one is removed."""
    out = tmp_path / "run"
    code, log = _launch_patched(tmp_path, "cpu2_ddp", _FAIL_ONE_RANK.format(rank=rank, call=2), "recipe=kd_tiny",
                                *FAST, f"output.dir={out}", *_kd_args(tiny_teacher))
    assert code != 0
    ckpts = out / "checkpoints"
    if rank == 0:
        assert _errors(log) == [f"error: No space left on device (writing checkpoint {ckpts / 'step-0000006'}); the "
                                f"run stopped: make room and rerun with resume=true, which continues from "
                                f"{ckpts / 'step-0000003'}"]
    else:
        assert _errors(log) == [f"error: another process could not write its part of checkpoint "
                                f"{ckpts / 'step-0000006'} (its error is above); the run stopped: fix that and rerun "
                                f"with resume=true, which continues from {ckpts / 'step-0000003'}"], log[-4000:]
        assert "process 1: No space left on device (writing checkpoint" in log
    assert "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log, log[-4000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000003"]


_FAIL_ZERO_FILE = """
original = torch.save

def save(obj, f, *a, **k):  # DeepSpeed's own checkpoint files (this rank's optimizer partition, or the model's)
    if torch.distributed.get_rank() == {rank} and "step-0000006" in str(f) and "{name}" in str(f):
        raise OSError(28, "No space left on device")
    return original(obj, f, *a, **k)

torch.save = save
"""


@pytest.mark.parametrize("rank,name", [(1, "optim_states"), (0, "model_states")])
def test_a_deepspeed_checkpoint_file_one_process_cannot_write_stops_every_process(tmp_path, tiny_teacher, rank, name):
    """Under ZeRO-3 DeepSpeed writes each process's partition between barriers of its own: a process that
    alone could not write its file left save_checkpoint while the others waited at DeepSpeed's next barrier,
    forever (the launch ran into this test's timeout). Now the others learn it, every process stops at once
    with one line, the partial checkpoint is removed, and resume=true goes on from the one before."""
    out = tmp_path / "run"
    args = ["recipe=kd_tiny", *FAST, f"output.dir={out}", *_kd_args(tiny_teacher), "train.micro_batch_size=2",
            "eval.report=false"]
    code, log = _launch_patched(tmp_path, "cpu2_zero3_offload", _FAIL_ZERO_FILE.format(rank=rank, name=name), *args,
                                timeout=240)
    assert code != 0
    ckpts = out / "checkpoints"
    where = f"checkpoint {ckpts / 'step-0000006'}"
    then = f"the run stopped: {{}} and rerun with resume=true, which continues from {ckpts / 'step-0000003'}"
    if rank == 0:
        assert _errors(log) == [f"error: No space left on device (writing {where}); {then.format('make room')}"]
    else:
        assert _errors(log) == [f"error: another process could not write its part of {where} (its error is above); "
                                f"{then.format('fix that')}"], log[-4000:]
        assert f"process 1: No space left on device (writing {where})" in log
    assert "]: Traceback" not in log, log[-4000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000003"]
    assert (ckpts / "step-0000003" / "latest").read_text() == "pytorch_model"  # for DeepSpeed's zero_to_fp32.py
    if rank == 1:
        code, log = _launch_patched(tmp_path, "cpu2_zero3_offload", None, *args, "resume=true")
        assert code == 0, log[-3000:]
        assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000003", "step-0000006"]
        assert (out / "model" / "config.json").is_file()


_FAIL_ONE_SHARD = """
import safetensors.torch

original = safetensors.torch.save_file

def save_file(tensors, path, *a, **k):
    if torch.distributed.get_rank() == 1 and "/model.tmp/" in path:  # stage 1 alone finds the disk full
        raise OSError(28, "No space left on device")
    return original(tensors, path, *a, **k)

safetensors.torch.save_file = save_file
"""

_FAIL_MAIN_MODEL = """
import transformers

original = transformers.PreTrainedModel.save_pretrained

def save_pretrained(self, path, *a, **k):
    if torch.distributed.get_rank() == 0 and str(path).endswith("model.tmp"):  # the disk fills up
        raise OSError(28, "No space left on device")
    return original(self, path, *a, **k)

transformers.PreTrainedModel.save_pretrained = save_pretrained
"""


@pytest.mark.parametrize("case", ["pipeline shard", "ddp main"])
def test_a_final_model_one_process_cannot_write_stops_every_process(tmp_path, tiny_teacher, case):
    """The final model of a pipeline run is written shard by shard, one per stage: stage 1 alone finding the
    disk full raised a traceback while stage 0 waited forever in the next collective. Under DDP the main
    process alone writes it: when it could not, the others had passed its barrier and died in gloo's
    'Connection reset by peer' traceback at the next one. Now every process stops at once, the main
    process names the model and how to go on, the partial model is removed, and resume=true writes it."""
    out = tmp_path / "run"
    config, patch, extra = {"pipeline shard": ("cpu2_pipeline", _FAIL_ONE_SHARD, "parallel.pipeline_stages=2"),
                            "ddp main": ("cpu2_ddp", _FAIL_MAIN_MODEL, "train.micro_batch_size=2")}[case]
    args = ["recipe=kd_tiny", *FAST, f"output.dir={out}", *_kd_args(tiny_teacher), extra, "eval.report=false"]
    code, log = _launch_patched(tmp_path, config, patch, *args)
    assert code != 0
    ckpt = out / "checkpoints" / "step-0000006"
    if case == "pipeline shard":
        assert _errors(log) == [f"error: another process could not write its part of the model {out / 'model'} (its "
                                f"error is above); the run stopped: fix that and rerun with resume=true, which "
                                f"continues from {ckpt}"], log[-4000:]
        assert "process 1: No space left on device (writing the model" in log
    else:
        assert _errors(log) == [f"error: No space left on device (writing the model {out / 'model'}); the run stopped: "
                                f"make room and rerun with resume=true, which continues from {ckpt}"], log[-4000:]
    assert "]: Traceback" not in log, log[-4000:]
    assert not (out / "model").exists() and not (out / "model.tmp").exists()
    code, log = _launch_patched(tmp_path, config, None, *args, "resume=true")
    assert code == 0, log[-3000:]
    assert (out / "model" / "config.json").is_file()


_PEER_STOPPED = "another process stopped (its error above, or the launcher's report below, says why)"

_FAIL_LOG_WRITE = """
from workbench import trainer

original = trainer.MetricsLog.write

class Full:
    def write(self, text):
        raise OSError(28, "No space left on device")

    def close(self):  # (the buffered line again)
        raise OSError(28, "No space left on device")

def write(self, rec):  # the main process alone writes the training log: the disk fills up at step 4
    if self.enabled and rec.get("step") == 4:
        self.file = Full()
    return original(self, rec)

trainer.MetricsLog.write = write
"""

_OOM_ONE_RANK = """
from workbench import trainer

original = trainer._micro_batch_jobs

def jobs(blocks, data, onp, seed, step, *a, **k):  # process 1 alone runs out of memory at step 5
    if torch.distributed.get_rank() == 1 and step == 5:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return original(blocks, data, onp, seed, step, *a, **k)

trainer._micro_batch_jobs = jobs
"""


@pytest.mark.parametrize("case", ["main's log", "rank 1 oom"])
def test_an_error_in_one_process_during_training_stops_every_process(tmp_path, tiny_teacher, case):
    """An error in one process while the others train on (the main process alone writes the training log;
    one process alone runs out of memory): it waited for the others in a barrier while they waited in the
    next step's gradient all-reduce, and the run hung for good after its error line. Now the process that
    failed says why and exits, the launcher stops the others, and the main process says how to go on."""
    out = tmp_path / "run"
    args = ["recipe=kd_tiny", *FAST, f"output.dir={out}", *_kd_args(tiny_teacher)]
    patch = {"main's log": _FAIL_LOG_WRITE, "rank 1 oom": _OOM_ONE_RANK}[case]
    tensorboard = ["output.tensorboard=true"] if case == "main's log" else []
    code, log = _launch_patched(tmp_path, "cpu2_ddp", patch, *args, *tensorboard, timeout=150)
    assert code != 0
    ckpt = out / "checkpoints" / "step-0000003"
    assert ckpt.is_dir()
    then = f"the run stopped: {{}} and rerun with resume=true, which continues from {ckpt}"
    if case == "main's log":
        assert _errors(log) == [f"error: No space left on device (writing the training log {out / 'metrics.jsonl'}); "
                                f"{then.format('make room')}"], log[-4000:]
        # the process exits at once, without closing its logs: TensorBoard's records up to then are on disk
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    else:
        assert _errors(log) == [
            f"error: out of memory on the GPU (2.00 GiB asked for): lower train.micro_batch_size (train.grad_accum_steps "
            f"keeps the batch), data.seq_len or distill.chunk_size; {then.format('change them (with allow_recipe_changes=true)')} "
            f"(process 1)",
            f"error: {_PEER_STOPPED}; {then.format('fix that')}"], log[-4000:]
    assert "]: Traceback" not in log and "Connection" not in log, log[-4000:]
    code, log = _launch_patched(tmp_path, "cpu2_ddp", None, *args, "resume=true")
    assert code == 0, log[-3000:]
    assert (out / "model" / "config.json").is_file()


def test_a_mistake_found_before_the_processes_meet_is_one_line_not_one_per_process(tmp_path, monkeypatch, capsys):
    """Every process of a launch finds a wrong key; each printed it (the line twice with 2 processes).
    Process 0 prints it; another prints it only if, after a wait, the launcher has not stopped it (process
    0 found nothing wrong: a file missing on one node only)."""
    from workbench import train

    code, log = _launch_patched(tmp_path, "cpu2_ddp", None, "recipe=kd_tiny", "train.lrr=1")
    assert code != 0
    assert _errors(log) == ["error: unknown key 'train.lrr'; did you mean 'train.lr'?"], log[-3000:]
    monkeypatch.setattr(train, "_REFUSE_WAIT_S", 0.0)
    monkeypatch.setenv("RANK", "1")
    assert train.main(["recipe=kd_tiny", "train.lrr=1"]) == 2
    assert capsys.readouterr().err == "error: unknown key 'train.lrr'; did you mean 'train.lr'? (process 1)\n"


def test_what_train_py_only_prints_is_printed_once_under_a_launcher(monkeypatch, capsys, caplog):
    """--list, --help, --help-recipe and --dry-run under accelerate launch printed their output once per
    process (the recipe's YAML twice with 2 processes), and every process warned of the recipe's own
    oddities (a key given twice): process 0 alone prints them."""
    from workbench import train

    for rank, warned in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        assert train.main(["recipe=kd_tiny", "train.lr=1e-3", "train.lr=2e-3", "--dry-run"]) == 0
        assert any("train.lr given twice" in r.getMessage() for r in caplog.records) == warned, rank
    capsys.readouterr()

    for flags in (["--list"], ["--help"], ["--help-recipe"], ["recipe=kd_tiny", "--dry-run"]):
        for rank, printed in (("1", False), ("0", True)):
            monkeypatch.setenv("RANK", rank)
            assert train.main(flags) == 0
            out = capsys.readouterr()
            assert bool(out.out.strip()) == printed, (flags, rank)
            assert bool(out.err.strip()) == (printed and "--dry-run" in flags), (flags, rank, out.err)


class _Launched:
    """What train.main sees of one process of a 2-process launch (no process group: unit tests)."""

    num_processes = 2

    def __init__(self, rank: int, barrier_error: Exception | None = None):
        self.process_index, self.is_main_process = rank, rank == 0
        self.barrier_error, self.barriers = barrier_error, 0

    def wait_for_everyone(self):
        self.barriers += 1
        if self.barrier_error is not None:
            raise self.barrier_error

    def end_training(self):
        pass


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", ["agreed", "alone", "peer gone", "peer gone after training"])
def test_how_a_process_of_a_launch_stops_after_an_error(tmp_path, monkeypatch, capsys, rank, case):
    """An error every process raised at the same point (after a collective: a checkpoint nobody could
    write, non-finite losses) ends in a barrier, the main process printing it. Any other may be this
    process's alone, with the others waiting in a collective it will never join: it exits at once (no
    barrier), the main process saying why, another process after a wait (in which the launcher stops it if
    the main process failed too). A collective failing because another process is gone: the main process
    says so and how to go on, another says nothing."""
    from workbench import config, train

    class Exited(Exception):
        pass

    def exit_now(code):
        raise Exited(code)

    out = tmp_path / "run"
    peer = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1")
    full = config.storage_error(OSError(28, "No space left on device"), "X")
    error = {"agreed": config.in_every_process(full),
             "alone": config.RecipeError("a file missing on this node"), "peer gone": peer,
             "peer gone after training": None}[case]
    accelerator = _Launched(rank, barrier_error=peer if case == "peer gone after training" else None)

    def run(recipe, acc):
        if error is not None:
            raise error
        return {"student_val_ppl": 1.0}

    monkeypatch.setattr("workbench.distributed.make_accelerator", lambda recipe: accelerator)
    monkeypatch.setattr(train, "run", run)
    monkeypatch.setattr(train, "format_summary", lambda metrics: "summary")
    monkeypatch.setattr(train, "_REFUSE_WAIT_S", 0.0)
    monkeypatch.setattr(train.os, "_exit", exit_now)
    argv = ["recipe=kd_tiny", f"output.dir={out}"]
    if case == "agreed":
        assert train.main(argv) == 2 and accelerator.barriers == 1
    else:
        with pytest.raises(Exited):
            train.main(argv)
        assert accelerator.barriers == (1 if case == "peer gone after training" else 0)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    then = "the run stopped: fix that and rerun with resume=true, which starts from the beginning (no checkpoint was saved)"
    expected = {
        "agreed": ["error: No space left on device (writing X); " + then.replace("fix that", "make room")] if rank == 0 else [],
        "alone": [f"error: a file missing on this node{' (process 1)' if rank else ''}"],
        "peer gone": [f"error: {_PEER_STOPPED}; {then}"] if rank == 0 else [],
        "peer gone after training": [f"error: {_PEER_STOPPED}"] if rank == 0 else [],
    }[case]
    assert lines == expected, err
