"""A file system that refuses a write (disk full, quota, read-only, permission) ends a command in one line
that says what was being written and how to go on; nothing partial is left behind, nothing complete is lost.

The refusals are simulated where the writes happen (a real full disk needs a mount): safetensors' writer,
torch.save's writer (which reports a full disk without the OS error) and plain OSErrors."""

from __future__ import annotations

import errno
import os
import types

import pytest
from conftest import FAST, fast_recipe, one_error_line

from workbench.config import StorageError, storage_error
from workbench.train import main

FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' wording


def _args(out, *more):
    return ["recipe=sft_tiny", *FAST, f"output.dir={out}", *more]


def _fail_on_call(monkeypatch, owner, name, n, exc, partial_file=None):
    """owner.name raises `exc` on its n-th call (after writing `partial_file` into the directory it was given,
    as a write cut short would), and runs as usual otherwise."""
    original = getattr(owner, name)
    calls = []

    def wrapper(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == n:
            if partial_file:
                os.makedirs(path, exist_ok=True)
                with open(os.path.join(path, partial_file), "wb") as f:
                    f.write(b"\0" * 1000)
            raise exc
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def test_storage_error_tells_refusals_from_other_errors(tmp_path, monkeypatch):
    e = storage_error(OSError(errno.ENOSPC, "No space left on device", "/x/metrics.jsonl"))
    assert isinstance(e, StorageError) and str(e) == "No space left on device: /x/metrics.jsonl"
    assert str(storage_error(PermissionError(errno.EACCES, "denied", "/x/y"), "the model /m")) == \
        "Permission denied (writing the model /m)"
    assert str(storage_error(OSError(errno.EROFS, "ro"))) == os.strerror(errno.EROFS)
    from safetensors import SafetensorError

    assert storage_error(SafetensorError(FULL), "x").errno == errno.ENOSPC
    for other in (FileNotFoundError(errno.ENOENT, "gone", "/x"), SafetensorError("Error while deserializing header"),
                  SafetensorError("I/O error: No such file or directory (os error 2)"), ValueError("no space"),
                  RuntimeError("unexpected pos 4532864 vs 4532752")):
        assert storage_error(other, "x", into=tmp_path) is None  # (tmp_path has room)
    # torch.save's writer on a full disk: a RuntimeError without the OS error; counted only when the
    # directory it wrote into is full or read-only
    full = types.SimpleNamespace(f_flag=0, f_bavail=0, f_frsize=4096)
    monkeypatch.setattr(os, "statvfs", lambda path: full)
    assert storage_error(RuntimeError("basic_ios::clear: iostream error"), "x", into=tmp_path).errno == errno.ENOSPC
    assert storage_error(RuntimeError("basic_ios::clear: iostream error"), "x") is None  # no directory given
    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_flag=os.ST_RDONLY, f_bavail=10**6,
                                                                          f_frsize=4096))
    assert storage_error(RuntimeError("iostream error"), "x", into=tmp_path).errno == errno.EROFS


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(capsys, tmp_path, monkeypatch):
    """The second checkpoint cannot be written: one line naming it and the checkpoint a resume continues
    from, its partial directory removed (the space a retry needs), the first intact; once there is room,
    resume=true finishes the run."""
    from accelerate import Accelerator
    from safetensors import SafetensorError

    out = tmp_path / "run"
    _fail_on_call(monkeypatch, Accelerator, "save_state", 2, SafetensorError(FULL), "model.safetensors")
    line = one_error_line(main(_args(out)), capsys.readouterr().err)
    ckpts = out / "checkpoints"
    assert f"No space left on device (writing checkpoint {ckpts / 'step-0000006'})" in line
    assert f"rerun with resume=true, which continues from {ckpts / 'step-0000003'}" in line
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000003"]
    assert (ckpts / "step-0000003" / "trainer_state.json").is_file() and not (out / "model").exists()
    monkeypatch.undo()
    assert main(_args(out, "resume=true")) == 0
    assert (out / "model" / "model.safetensors").is_file()


def test_torch_saves_full_disk_and_a_refused_model(capsys, tmp_path, monkeypatch):
    """torch.save's writer on a full disk (no OS error in its message) before any checkpoint; then the
    final model refused: its partial directory removed, the last checkpoint named, and resume=true writes it."""
    from accelerate import Accelerator
    from transformers import PreTrainedModel

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _fail_on_call(m, Accelerator, "save_state", 1, RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                                    "unexpected pos 4532864 vs 4532752"), "optimizer.bin")
        m.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_flag=0, f_bavail=3, f_frsize=4096))
        line = one_error_line(main(_args(out)), capsys.readouterr().err)
    assert "No space left on device (writing checkpoint" in line
    assert "starts from the beginning (no checkpoint was saved)" in line
    assert list((out / "checkpoints").iterdir()) == []

    with monkeypatch.context() as m:  # the same RuntimeError with room on the disk is not a full disk
        _fail_on_call(m, Accelerator, "save_state", 1, RuntimeError("unexpected pos 4532864 vs 4532752"))
        with pytest.raises(RuntimeError, match="unexpected pos"):
            main(_args(tmp_path / "other"))

    with monkeypatch.context() as m:
        _fail_on_call(m, PreTrainedModel, "save_pretrained", 1,
                      OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "model.safetensors")
        line = one_error_line(main(_args(out, "resume=true")), capsys.readouterr().err)
    assert f"{os.strerror(errno.EDQUOT)} (writing the model {out / 'model'})" in line
    assert f"continues from {out / 'checkpoints' / 'step-0000006'}" in line
    assert not (out / "model").exists() and not (out / "model.tmp").exists()
    assert main(_args(out, "resume=true")) == 0
    assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "make room"), (errno.EACCES, "fix that")])
def test_a_refused_report_says_the_model_is_saved(capsys, tmp_path, monkeypatch, code, fix):
    import workbench.train as T

    out = tmp_path / "run"

    def report(recipe, accelerator):
        raise OSError(code, os.strerror(code), str(out / "report.html"))

    monkeypatch.setattr(T, "_report", report)
    line = one_error_line(main(_args(out, "eval.report=true")), capsys.readouterr().err)
    assert f"{os.strerror(code)}: {out / 'report.html'}; the trained model is saved in {out / 'model'}: {fix}, " \
           f"then python workbench/evaluate.py {out} writes the report" in line
    assert (out / "model" / "model.safetensors").is_file()


def test_consolidate_into_a_full_disk_keeps_the_old_destination(capsys, tmp_path, accelerator, monkeypatch):
    from transformers import PreTrainedModel

    from workbench.consolidate import main as consolidate_main
    from workbench.train import run

    run(fast_recipe("sft_tiny", tmp_path / "run", "train.max_steps=2", "train.checkpoint_every=2"), accelerator)
    ckpt, dst = tmp_path / "run" / "checkpoints" / "step-0000002", tmp_path / "student"
    dst.mkdir()
    (dst / "mine.txt").write_text("kept")
    _fail_on_call(monkeypatch, PreTrainedModel, "save_pretrained", 1,
                  OSError(errno.ENOSPC, "No space left on device"), "model.safetensors")
    line = one_error_line(consolidate_main([str(ckpt), str(dst), "--overwrite"]), capsys.readouterr().err)
    assert line == f"error: No space left on device (writing {dst})"
    assert (dst / "mine.txt").read_text() == "kept" and not list(tmp_path.glob(".student*"))


def test_a_cache_entry_the_disk_cannot_hold_is_removed_and_named(tmp_path, monkeypatch):
    """numpy's writer on a full disk: an OSError without errno ("N requested and M written") while packing
    data into the cache; the entry's partial directory is removed and the error names the entry."""
    from workbench.data import _atomic_dir

    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_flag=0, f_bavail=0, f_frsize=4096))
    entry = tmp_path / "packed" / "key"
    with pytest.raises(StorageError, match=f"^No space left on device \\(writing {entry}\\)$"):
        with _atomic_dir(entry) as tmp:
            (tmp / "train.npy").write_bytes(b"\0" * 100)
            raise OSError("2634752 requested and 389056 written")
    assert list((tmp_path / "packed").iterdir()) == []
    with pytest.raises(ValueError, match="not a storage error"):  # anything else passes through unchanged
        with _atomic_dir(entry):
            raise ValueError("not a storage error")
    assert list((tmp_path / "packed").iterdir()) == []


def test_a_report_that_cannot_be_written_whole_leaves_the_previous_one(tmp_path, monkeypatch):
    """The report's files are written beside their places and moved in only when all are written: the disk
    filling up at the third file leaves the previous report as it was and no partial file."""
    from pathlib import Path

    from workbench.rundir import write_together

    names = ["report_plots/losses.png", "report.md", "report.html", "report.json"]
    write_together({tmp_path / n: b"old " + n.encode() for n in names}, "the report")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert len(before) == 4
    original, calls = Path.write_bytes, []

    def write_bytes(self, data):
        calls.append(self.name)
        if len(calls) == 3:
            original(self, data[:10])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(StorageError, match=r"^No space left on device \(writing the report\)$"):
        write_together({tmp_path / n: b"new " + n.encode() for n in names}, "the report")
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    write_together({tmp_path / n: b"new" for n in names}, "the report")
    assert {p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == {b"new"}

    # a first report that cannot be written leaves no directory it made (an empty report_plots/ stayed)
    first = tmp_path / "first"
    first.mkdir()
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    calls.clear()
    with pytest.raises(StorageError):
        write_together({first / n: b"new" for n in ["report_plots/a/x.png", "report_plots/b/y.png", *names[1:]]},
                       "the report")
    assert list(first.iterdir()) == []


def test_a_metrics_line_cut_short_is_skipped_on_resume_and_in_reports(tmp_path, accelerator, caplog):
    """metrics.jsonl whose last write was cut short (a kill, a full disk): resume drops the damaged line with
    a warning (it was json's traceback) and the file reads as one uninterrupted run; the report reads it too."""
    import json

    from workbench.trainer import read_metrics
    from workbench.train import run

    out = tmp_path / "run"
    run(fast_recipe("sft_tiny", out, "train.max_steps=3"), accelerator)
    whole = read_metrics(out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 5.1')
    assert read_metrics(out) == whole and len(whole) >= 3
    assert "skipped 1 line(s) that are not whole records" in caplog.text
    run(fast_recipe("sft_tiny", out, "train.max_steps=6", "resume=true"), accelerator)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "train/loss" in json.loads(line)] == [1, 2, 3, 4, 5, 6]
    assert not list(out.glob(".metrics*"))


def _interrupted_line(command, argv, capsys) -> str:
    """Ctrl-C in command(argv): exit status 130 and one 'error: interrupted' line, no traceback."""
    try:
        code = command(argv)
    except KeyboardInterrupt:  # (not let through: it would stop the test session)
        pytest.fail("Ctrl-C escaped the command as a KeyboardInterrupt")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:") or "Traceback" in ln]
    assert code == 130 and len(lines) == 1 and lines[0].startswith("error: interrupted"), (code, err[-3000:])
    return lines[0]


def test_ctrl_c_outside_the_training_loop_is_one_line_that_says_how_to_go_on(capsys, tmp_path, monkeypatch):
    """Ctrl-C while the report is written (the model saved), and a second Ctrl-C inside the loop (an abort,
    here while a checkpoint is written): one line, exit status 130, saying what is saved and what to run."""
    import workbench.train as T
    import workbench.trainer as TR

    out = tmp_path / "run"

    def report(recipe, accelerator):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(T, "_report", report)
        line = _interrupted_line(main, _args(out, "eval.report=true"), capsys)
    assert line == (f"error: interrupted; the trained model is saved in {out / 'model'}: python workbench/evaluate.py "
                    f"{out} writes the report")

    again = tmp_path / "again"
    save, calls = TR.save_checkpoint, []

    def save_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return save(*args, **kwargs)

    monkeypatch.setattr(TR, "save_checkpoint", save_checkpoint)
    line = _interrupted_line(main, _args(again), capsys)
    assert line == ("error: interrupted; the run stopped: rerun with resume=true, which continues from "
                    f"{again / 'checkpoints' / 'step-0000003'}")


def test_ctrl_c_in_the_other_commands_is_one_line(capsys, tmp_path, monkeypatch):
    import workbench.evaluation as E
    from workbench import evaluate, speculate

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "load_run", stop)
    _interrupted_line(evaluate.main, [str(tmp_path)], capsys)
    monkeypatch.setattr(speculate, "load_decoder", stop)
    (tmp_path / "draft").mkdir()
    _interrupted_line(speculate.main, ["--draft", str(tmp_path / "draft")], capsys)
